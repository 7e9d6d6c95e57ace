"""`sarmerge methods`: list the registered merge methods with their parameters and defaults."""

import argparse

from sarmerge.methods import all_methods


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    for name, m in all_methods().items():
        needs = ["base_model"] if m.needs_base else []
        if m.fisher != "none":
            needs.append(f"fisher ({m.fisher})")
        notes = [f"needs {', '.join(needs)}"] if needs else []
        notes.append(_streaming(m.chunking_for(m.params()), len(m.stats)))
        print(f"{name:18s} {m.description}  [{'; '.join(notes)}]")
        print(f"{'':20s}vs mergekit: {m.mergekit or 'no mergekit counterpart'}")
        for field_name, f in m.params.model_fields.items():
            print(
                f"{'':20s}{f.alias or field_name} = {f.default!r}" + (f"  # {f.description}" if f.description else "")
            )
    return 0


def _streaming(mode: str, passes: int) -> str:
    """How large tensors go through the method at its default parameters (memory: a chunk, or a whole tensor)."""
    if mode == "tensor":
        return "whole tensors"
    if mode == "multi_pass":
        return f"row chunks after {passes} statistics pass{'es' if passes > 1 else ''}"
    return "row chunks"
