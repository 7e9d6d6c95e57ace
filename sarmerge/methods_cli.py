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
        print(f"{name:18s} {m.description}" + (f"  [needs {', '.join(needs)}]" if needs else ""))
        for field_name, f in m.params.model_fields.items():
            print(
                f"{'':20s}{f.alias or field_name} = {f.default!r}" + (f"  # {f.description}" if f.description else "")
            )
    return 0
