#!/usr/bin/env python3
"""Golden fixtures for Sluice's engine, produced by the reference: HF transformers (>= 5.23, CPU).

For each case this script builds a tiny random model with transformers, writes it in the
checkpoint layout the case covers, loads it back with transformers (float32, eager attention)
where transformers can read that layout, and records:

  golden.safetensors:
    prompt  [T]         int32   the prompt token ids (T = 111 > one 64-token chunk)
    logits  [T, vocab]  float32 logits of every prompt position from one full forward pass
    greedy  [32]        int32   32 greedy tokens decoded with transformers' own cache
                                (chunked prefill, then the recurrent single-token path)

Usage (outside the repo, once):  python3 -m venv /tmp/oracle && /tmp/oracle/bin/pip install torch \
    transformers==5.23.0 safetensors;  /tmp/oracle/bin/python tests/oracle/make_fixtures.py
Writes tests/fixtures/golden/<case>/.
"""

import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3NextForCausalLM,
)
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "golden")
PROMPT_LEN = 111
GREEDY = 32
VOCAB = 256

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    eos_token_id=[VOCAB - 2, VOCAB - 1],
)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24)


def randomize(model, seed):
    """Deterministic weights scaled so activations stay O(1) and routing is non-degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g)
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.2 * r)  # plain weight (x̂·w)
            elif "norm" in name:
                p.copy_(0.2 * r)  # zero-centred (x̂·(1+w))
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(0.05, 1.0, generator=g)))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * r)
            elif "conv1d" in name:
                p.copy_(0.4 * r)
            elif "embed_tokens" in name:
                # Tied embeddings double as the LM head: keep those logits O(1) as well.
                p.copy_((0.2 if model.config.tie_word_embeddings else 0.5) * r)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(3.0 * r / math.sqrt(p.shape[-1]))
            else:
                p.copy_(r / math.sqrt(p.shape[-1]))


def conditioning(model, prompt):
    """Max |f32 − f64| of the reference's own logits. Random models can be ill-conditioned
    (Gated DeltaNet's gated RMSNorm rescales rows whose output nearly cancels), and then no two
    f32 implementations agree to 1e-4; such draws are rejected."""
    import copy
    m64 = copy.deepcopy(model).double()
    m64.set_attn_implementation("eager")
    if hasattr(m64, "set_experts_implementation"):
        try:
            m64.set_experts_implementation("eager")
        except Exception:  # dense models have no experts
            pass
    with torch.no_grad():
        a = model.float()(prompt[None, :]).logits[0].double()
        b = m64(prompt[None, :]).logits[0]
    return (a - b).abs().max().item()


MAX_CONDITIONING = 3e-5


def well_conditioned(make, first_seed):
    """The first seed from `first_seed` whose model passes `conditioning`; returns (model, seed)."""
    for seed in range(first_seed, first_seed + 1000, 100):
        model = make(seed)
        c = conditioning(model, prompt_ids(seed))
        if c <= MAX_CONDITIONING:
            print(f"  seed {seed}: f32 vs f64 max |Δ| {c:.2e}", flush=True)
            return model, seed
        print(f"  seed {seed}: f32 vs f64 max |Δ| {c:.2e}, rejected", flush=True)
    raise SystemExit("no well-conditioned seed found")


def randomized(cls, cfg, seed, bf16=False):
    model = cls(cfg).float()
    randomize(model, seed)
    if bf16:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not (name.endswith("A_log") or name.endswith("linear_attn.norm.weight")):
                    p.copy_(p.bfloat16().float())
    return model


def prompt_ids(seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, VOCAB - 2, (PROMPT_LEN,), generator=g)


@torch.no_grad()
def goldens(model, prompt):
    model.eval()
    logits = model(prompt[None, :]).logits[0].float()
    out = model(prompt[None, :], use_cache=True)
    cache = out.past_key_values
    tok = out.logits[0, -1].argmax()
    greedy = [int(tok)]
    while len(greedy) < GREEDY:
        out = model(tok.view(1, 1), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tok = out.logits[0, -1].argmax()
        greedy.append(int(tok))
    return logits, torch.tensor(greedy, dtype=torch.int32)


def write_golden(path, prompt, logits, greedy):
    save_file(
        {"prompt": prompt.to(torch.int32).contiguous(), "logits": logits.contiguous(),
         "greedy": greedy.contiguous()},
        os.path.join(path, "golden.safetensors"),
    )


def fresh_dir(case):
    path = os.path.join(OUT, case)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def strip_to_config_and_weights(path):
    keep = {"config.json", "model.safetensors", "model.safetensors.index.json",
            "golden.safetensors"}
    for f in os.listdir(path):
        if f not in keep and not f.startswith("model-"):
            os.remove(os.path.join(path, f))


def save_and_reload(model, cls, path, seed, **save_kw):
    model.save_pretrained(path, **save_kw)
    reloaded = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.set_attn_implementation("eager")
    prompt = prompt_ids(seed)
    logits, greedy = goldens(reloaded, prompt)
    ref_logits = model(prompt[None, :]).logits[0].float()
    diff = (logits - ref_logits).abs().max().item()
    assert diff < 2e-5, f"{path}: reload changed the model ({diff})"
    write_golden(path, prompt, logits, greedy)
    strip_to_config_and_weights(path)
    return prompt


def case_moe():
    """qwen3_5_moe_text, text-only layout (`model.*`), untied, as transformers saves it."""
    cfg = Qwen3_5MoeTextConfig(**COMMON, **MOE, tie_word_embeddings=False)
    model, seed = well_conditioned(lambda s: randomized(Qwen3_5MoeForCausalLM, cfg, s), 1)
    save_and_reload(model, Qwen3_5MoeForCausalLM, fresh_dir("moe"), seed)


def case_dense_tied_sharded():
    """qwen3_5_text (dense SwiGLU), tied embeddings, sharded with an index file."""
    cfg = Qwen3_5TextConfig(**COMMON, intermediate_size=96, tie_word_embeddings=True)
    model, seed = well_conditioned(lambda s: randomized(Qwen3_5ForCausalLM, cfg, s), 2)
    path = fresh_dir("dense_tied")
    save_and_reload(model, Qwen3_5ForCausalLM, path, seed, max_shard_size="60KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))


def case_next():
    """qwen3_next: fused in_proj_qkvz / in_proj_ba, per-expert weights, a dense-only layer,
    norm_topk_prob = false."""
    common = dict(COMMON)
    common.pop("layer_types")
    cfg = Qwen3NextConfig(**common, **MOE, intermediate_size=80, decoder_sparse_step=1,
                          mlp_only_layers=[1], norm_topk_prob=False,
                          layer_types=COMMON["layer_types"], tie_word_embeddings=False)
    model, seed = well_conditioned(lambda s: randomized(Qwen3NextForCausalLM, cfg, s), 3)
    save_and_reload(model, Qwen3NextForCausalLM, fresh_dir("next"), seed)


def fuse_experts(tensors, prefix_in, prefix_out, n_layers, n_experts):
    """Rename `prefix_in` → `prefix_out` and store experts fused as the Qwen3.5 release does."""
    out = {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            continue
        assert name.startswith(prefix_in) or name.startswith("lm_head"), name
        out[name.replace(prefix_in, prefix_out, 1)] = t
    for layer in range(n_layers):
        base = f"{prefix_in}layers.{layer}.mlp.experts."
        if base + "gate_up_proj" in tensors:
            gate_up, down = tensors[base + "gate_up_proj"], tensors[base + "down_proj"]
        else:
            gate_up = torch.stack([
                torch.cat([tensors[f"{base}{e}.gate_proj.weight"],
                           tensors[f"{base}{e}.up_proj.weight"]], dim=0)
                for e in range(n_experts)])
            down = torch.stack([tensors[f"{base}{e}.down_proj.weight"] for e in range(n_experts)])
        o = f"{prefix_out}layers.{layer}.mlp.experts."
        out[o + "gate_up_proj"] = gate_up.contiguous()
        out[o + "down_proj"] = down.contiguous()
    return out


def case_vl_fused():
    """The Qwen3.5 release layout: `qwen3_5_moe` wrapper config with `text_config` and a
    `vision_config`, text weights under `model.language_model.`, fused experts, plus
    vision and MTP tensors that the engine must ignore. The goldens come from the same weights
    run by the text-only model."""
    cfg = Qwen3_5MoeTextConfig(**COMMON, **MOE, tie_word_embeddings=False)
    model, seed = well_conditioned(lambda s: randomized(Qwen3_5MoeForCausalLM, cfg, s), 4)
    path = fresh_dir("vl_fused")
    tmp = path + ".tmp"
    save_and_reload(model, Qwen3_5MoeForCausalLM, tmp, seed)
    tensors = load_file(os.path.join(tmp, "model.safetensors"))
    tensors = fuse_experts(tensors, "model.", "model.language_model.", 4, MOE["num_experts"])
    g = torch.Generator().manual_seed(99)
    tensors["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 4, 4, generator=g)
    tensors["mtp.fc.weight"] = torch.randn(48, 96, generator=g)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    text = json.load(open(os.path.join(tmp, "config.json")))
    text["model_type"] = "qwen3_5_moe_text"
    text.pop("architectures", None)
    wrapper = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 8},
        "tie_word_embeddings": False,
        "image_token_id": 248056,
    }
    json.dump(wrapper, open(os.path.join(path, "config.json"), "w"), indent=2)
    shutil.copy(os.path.join(tmp, "golden.safetensors"), path)
    shutil.rmtree(tmp)


def case_bf16():
    """A bf16 checkpoint with f32 `A_log` and `linear_attn.norm.weight`, as in the 35B-A3B
    release. The reference runs in float32 on the bf16-rounded weights."""
    cfg = Qwen3_5MoeTextConfig(**COMMON, **MOE, tie_word_embeddings=False)
    model, seed = well_conditioned(lambda s: randomized(Qwen3_5MoeForCausalLM, cfg, s, bf16=True), 5)
    path = fresh_dir("bf16")
    model.save_pretrained(path)
    st = os.path.join(path, "model.safetensors")
    tensors = load_file(st)
    mixed = {
        k: (v if k.endswith("A_log") or k.endswith("linear_attn.norm.weight")
            else v.to(torch.bfloat16)).contiguous()
        for k, v in tensors.items()
    }
    save_file(mixed, st, metadata={"format": "pt"})
    cfg_json = json.load(open(os.path.join(path, "config.json")))
    cfg_json["dtype"] = "bfloat16"
    json.dump(cfg_json, open(os.path.join(path, "config.json"), "w"), indent=2)
    reloaded = Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager")
    prompt = prompt_ids(seed)
    logits, greedy = goldens(reloaded, prompt)
    write_golden(path, prompt, logits, greedy)
    strip_to_config_and_weights(path)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cases = [case_moe, case_dense_tied_sharded, case_next, case_vl_fused, case_bf16]
    only = sys.argv[1:]
    for case in cases:
        if only and case.__name__.removeprefix("case_") not in only:
            continue
        print("making", case.__name__, flush=True)
        case()


if __name__ == "__main__":
    main()
