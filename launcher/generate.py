"""eval.generate: what the model answers at each evaluation, greedy, written to output_dir/samples.jsonl (and
TensorBoard, when on) by the main process.

It runs the unwrapped model on the main process alone (DDP: no collective is involved in a forward of the bare
module), in eval mode, under a forked RNG: the training's numbers and random streams are as without it. FSDP2 and
DeepSpeed are refused in config.py, since there every rank would have to take part in each token's forward.
No KV cache: each new token is one forward of the whole context (at most data.seq_len tokens), a cost paid only
at evaluations, for a few prompts.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from launcher.config import Config
from launcher.data.formats import TARGET, chat_template, compile_template
from launcher.models import logits_of


def listed_prompt_ids(cfg: Config, tokenizer, prompts: list[str]) -> list[list[int]]:
    """eval.generate.prompts as the model reads them: format chat renders each as a user turn with the template's
    generation prompt (the assistant header); the other formats as text, with the tokenizer's special tokens."""
    if cfg.data.format != "chat":
        return tokenizer.encode_texts(prompts, special_tokens=True)
    template = compile_template(chat_template(cfg.data, tokenizer))
    specials = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token}
    texts = [template.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True, **specials) for p in prompts]
    return [ids for ids, _ in tokenizer.encode_with_offsets(texts)]


def held_out_prompt_ids(eval_data, n: int) -> list[list[int]]:
    """The first `n` held-out rows' prompts: the ids before the first target (prompt_completion, chat: the prompt or
    the conversation up to the assistant's answer), or the first half of the row's ids (text)."""
    rows = eval_data.store.rows(np.arange(min(n, len(eval_data.store))))
    prompts = []
    for i, length in enumerate(rows["length"]):
        ids = rows["input_ids"][i, :length]
        if "kinds" in rows:
            first_target = int(np.argmax(rows["kinds"][i, :length] == TARGET))
            prompts.append(ids[: max(first_target, 1)].tolist())
        else:
            prompts.append(ids[: max(length // 2, 1)].tolist())
    return prompts


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, context: int, eos_id: int, device: torch.device) -> list[int]:
    """The most likely next token, again and again, until EOS or max_new_tokens (each token a host-device sync)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits_of(model(ids[:, -context:]))[0, -1].argmax())
        if token == eos_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], dtype=torch.long, device=device)], dim=1)
    return new


def write_generations(run, step: int, tensorboard=None) -> OSError | None:
    """Main process: one samples.jsonl row per prompt for the evaluation at `step`; a failed write is returned."""
    cfg, acc = run.cfg, run.accelerator
    if cfg.eval.generate is None or not acc.is_main_process:
        return None
    settings = cfg.eval.generate
    tokenizer = run.tokenizer
    if settings.prompts is not None:
        prompts = listed_prompt_ids(cfg, tokenizer, settings.prompts)
    else:
        prompts = held_out_prompt_ids(run.eval_data, settings.n)
    model = acc.unwrap_model(run.model, keep_torch_compile=False)
    was_training = model.training
    model.eval()  # no dropout: greedy answers are the model's, and no random number is drawn
    devices = [acc.device] if acc.device.type == "cuda" else []
    rows = []
    try:
        with torch.random.fork_rng(devices=devices), acc.autocast():
            for prompt in prompts:
                new = greedy(model, prompt, settings.max_new_tokens, cfg.data.seq_len, tokenizer.eos_id, acc.device)
                rows.append({"step": step, "prompt": tokenizer.decode(prompt), "answer": tokenizer.decode(new), "new_tokens": len(new)})
    finally:
        model.train(was_training)
    try:
        with (cfg.output_dir / "samples.jsonl").open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    except OSError as err:
        return err
    if tensorboard is not None:
        for i, row in enumerate(rows):
            tensorboard.add_text(f"samples/{i}", f"{row['prompt']} **{row['answer']}**", global_step=step)
    return None
