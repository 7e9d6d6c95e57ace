"""Training loops for the model zoo: supervised fine-tuning and GRPO with verifiable rewards, plus sampling/evaluation.

Everything is seeded through explicit `torch.Generator`s (never the global RNG) so a run is bitwise reproducible on a
given machine and thread count. Prompts always go through the tokenizer's chat template (`tasks.chat_prompt`).

GRPO (Shao et al. 2024, as in DeepSeekMath/DAPO): per step, `prompts` problems × `group` completions sampled at
temperature 1; reward = the task's exact-match score; advantage = (r − mean_group) / (std_group + 1e-4), so groups where
every completion scored the same carry no signal; loss = −mean over completion tokens of min(ρA, clip(ρ, 1±ε)A), with
ρ the ratio to the sampling policy, optionally + β·KL(π‖π_base) (k3 estimator). The model starts from the bf16 base and
trains with fp32 master weights (as mixed-precision RL trainers do); checkpoints are saved in bf16, where any
accumulated update smaller than half a bf16 ulp of its weight vanishes — the mechanism that makes real RLVR
checkpoints sparse.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sarmerge.zoo.tasks import Problem, Task, chat_prompt

log = logging.getLogger(__name__)


def encode_prompts(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """Token ids of each problem's chat-templated prompt (the template holds every special token it needs)."""
    if not problems:
        return []
    texts = [chat_prompt(tokenizer, p.prompt) for p in problems]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Complete every prompt (left-padded batch, KV cache); greedy at temperature 0, else sampled with `generator`.

    Returns the generated ids per prompt, ending with eos when the model emitted it within `max_new_tokens`.
    """
    was_training = model.training
    model.eval()
    dev = _device(model)  # bookkeeping and sampling stay on the CPU (one seeded generator whatever the device)
    ids, mask = _left_pad(prompt_ids, pad_id)
    pos = _positions(mask)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1, :].float().cpu()
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in prompt_ids]
    next_pos = pos[:, -1:] + 1
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(dim=-1)
        for i in torch.nonzero(~finished).flatten().tolist():
            generated[i].append(int(token[i]))
        finished |= token == eos_id
        if bool(finished.all()):
            break
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        mask = torch.cat([mask, (~finished).long().unsqueeze(-1)], dim=-1)
        out = model(input_ids=token.unsqueeze(-1).to(dev), attention_mask=mask.to(dev),
                    position_ids=next_pos.to(dev), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :].float().cpu()
        next_pos = next_pos + 1
    model.train(was_training)
    return generated


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    """Text of a completion up to (not including) eos."""
    eos = tokenizer.eos_token_id
    cut = list(ids[: ids.index(eos)]) if eos in ids else list(ids)
    return tokenizer.decode(cut, skip_special_tokens=True)


def max_new_tokens_for(task: Task) -> int:
    return task.max_new_tokens or task.max_answer_chars + 2


def evaluate(model, tokenizer, task: Task, problems: Sequence[Problem], batch_size: int = 256) -> float:
    """Greedy accuracy (mean task score) on `problems`."""
    total = 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start: start + batch_size]
        outs = generate(model, encode_prompts(tokenizer, chunk), max_new_tokens=max_new_tokens_for(task),
                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
        total += sum(task.score(decode_completion(tokenizer, o), p.answer) for o, p in zip(outs, chunk, strict=True))
    return total / max(1, len(problems))


def _sequence_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt+completion rows; `target_mask[b, t]` marks where token t+1 is a completion token."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    ids, mask = _left_pad(rows, pad_id)
    target_mask = torch.zeros_like(ids, dtype=torch.bool)
    width = ids.shape[1]
    for i, c in enumerate(completion_ids):
        if c:
            target_mask[i, width - len(c) - 1: width - 1] = True
    return ids, mask, _positions(mask), target_mask[:, :-1]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | ≤ t) for every position, shape [B, T-1], on the model's device."""
    dev = _device(model)
    ids = ids.to(dev)
    logits = model(input_ids=ids, attention_mask=mask.to(dev), position_ids=pos.to(dev)).logits[:, :-1, :].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def _adamw(model, lr: float, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8) -> torch.optim.Optimizer:
    # no weight decay: decay would touch every weight and erase the sparsity RLVR updates are known for
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=False)


@dataclass
class SFTConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 20
    # share of demonstrations that show the task's typical slip instead of the answer (imperfect demonstrations): the
    # base then prefers the plausible wrong rule while giving the right one real probability — the situation where RL
    # with verifiable rewards helps, and where diluting the RL update (e.g. by averaging) falls back to the slip
    slip_rate: float = 0.6
    # relative share of each task in the mixture (tasks not named weigh 1); digit sums are learned more slowly than the
    # string expressions, so math gets three times the examples by default
    task_weights: dict[str, float] = field(default_factory=lambda: {"math": 3.0})


def sft(model, tokenizer, tasks: Sequence[Task], cfg: SFTConfig, seed: int, progress: bool = True) -> list[float]:
    """Supervised fine-tuning on a mixture of the tasks' train splits (loss on the answer and eos only)."""
    streams = [t.stream(seed=seed, split="train") for t in tasks]
    weights = [cfg.task_weights.get(t.name, 1.0) for t in tasks]
    rng = random.Random(f"sft:{seed}")
    opt = _adamw(model, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="sft", disable=not progress, mininterval=2)
    for _ in bar:
        batch = [next(streams[i]) for i in rng.choices(range(len(streams)), weights=weights, k=cfg.batch_size)]
        prompt_ids = encode_prompts(tokenizer, batch)
        targets = [p.slip if p.slip and rng.random() < cfg.slip_rate else p.answer for p in batch]
        answers = [[*list(ids), tokenizer.eos_token_id]
                   for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]
        ids, mask, pos, tmask = _sequence_batch(prompt_ids, answers, tokenizer.pad_token_id)
        logp = token_logprobs(model, ids, mask, pos)
        tmask = tmask.to(logp.device)
        loss = -(logp * tmask).sum() / tmask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


@dataclass
class GRPOConfig:
    steps: int = 60
    prompts: int = 8  # problems per step
    group: int = 16  # completions per problem (large groups: fewer all-wrong groups without signal)
    temperature: float = 1.0
    clip: float = 0.2  # PPO ratio clip; only bites when epochs > 1
    kl_coef: float = 0.0  # β of the k3 KL to the base (0 = none, as in DAPO)
    epochs: int = 1  # optimisation passes per sampled batch (1 = strictly on-policy)
    max_grad_norm: float = 1.0
    # Plain SGD by default: its steps follow the heavy-tailed gradient, so most weights move less than half a bf16
    # ulp and the bf16 checkpoint keeps them bit-identical to the base (RLVR-like sparsity; measured on the tiny
    # family: 72–78 % unchanged). AdamW normalises every coordinate to a step of about `lr`: at the learning rates a
    # tiny model needs to learn within a few dozen steps it changed over half of all weights, and at rates sparse
    # enough it barely learned (measured: lr 1e-4 → 48 % unchanged; 3e-5 → 85 % but +5 points at most). At LLM scale
    # AdamW with lr ~1e-6 is sparse for the same reason SGD is here (the SmolLM2 family uses it).
    # Lower rates with more steps gave more gain per changed weight (lr 5e-3 × 60 steps beat 1e-2 × 20 at equal
    # sparsity); 8 problems × 16 completions beat 16 × 8 at equal cost.
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 5e-3
    momentum: float = 0.0  # sgd
    betas: tuple[float, float] = (0.9, 0.99)  # adamw
    eps: float = 1e-8  # adamw


def grpo(model, tokenizer, task: Task, cfg: GRPOConfig, seed: int, reference=None, progress: bool = True,
         callback: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """GRPO on `task`'s train split; returns per-step stats (mean reward, share of groups with signal, loss)."""
    if cfg.kl_coef > 0 and reference is None:
        raise ValueError("kl_coef > 0 needs the reference (base) model")
    problems = task.generate(cfg.prompts * cfg.steps, seed=seed, split="train")
    gen = torch.Generator().manual_seed(seed)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, foreach=False)
    elif cfg.optimizer == "adamw":
        opt = _adamw(model, cfg.lr, cfg.betas, cfg.eps)
    else:
        raise ValueError(f"GRPOConfig.optimizer must be 'sgd' or 'adamw', not {cfg.optimizer!r}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    history = []
    bar = tqdm(range(cfg.steps), desc=f"grpo {task.name} s{seed}", disable=not progress, mininterval=2)
    for step in bar:
        batch = problems[step * cfg.prompts: (step + 1) * cfg.prompts]
        prompt_ids = [ids for ids in encode_prompts(tokenizer, batch) for _ in range(cfg.group)]
        completions = generate(model, prompt_ids, max_new_tokens=max_new_tokens_for(task), eos_id=eos, pad_id=pad,
                               temperature=cfg.temperature, generator=gen)
        rewards = torch.tensor([task.score(decode_completion(tokenizer, c), p.answer)
                                for c, p in zip(completions, [p for p in batch for _ in range(cfg.group)],
                                                strict=True)]).view(cfg.prompts, cfg.group)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        informative = float((rewards.std(1) > 0).float().mean())
        ids, mask, pos, tmask = _sequence_batch(prompt_ids, completions, pad)
        tmask, adv = tmask.to(_device(model)), adv.to(_device(model))
        old_logp = ref_logp = None
        with torch.no_grad():
            # with one pass the sampling policy is the current one: ratio = exp(logp - logp.detach())
            if cfg.epochs > 1:
                old_logp = token_logprobs(model, ids, mask, pos)
            if cfg.kl_coef > 0:
                ref_logp = token_logprobs(reference, ids, mask, pos)
        loss_value = 0.0
        if informative > 0:
            model.train()
            for _ in range(cfg.epochs):
                logp = token_logprobs(model, ids, mask, pos)
                ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))
                a = adv.unsqueeze(-1)
                per_token = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
                if ref_logp is not None:
                    d = ref_logp - logp
                    per_token = per_token + cfg.kl_coef * (torch.exp(d) - d - 1)
                # token-level mean over the whole batch (DAPO), so long and short completions weigh per token
                loss = (per_token * tmask).sum() / tmask.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                loss_value = loss.item()
        history.append({"reward": float(rewards.mean()), "informative_groups": informative, "loss": loss_value})
        bar.set_postfix(reward=f"{history[-1]['reward']:.2f}", refresh=False)
        if callback is not None:
            callback(step, history[-1])
    return history


def unchanged_fraction(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> float:
    """Share of weights bitwise equal between two state dicts (compare in the saved dtype, e.g. bf16)."""
    same = total = 0
    for name, b in base.items():
        same += int((tuned[name] == b).sum())
        total += b.numel()
    return same / total
