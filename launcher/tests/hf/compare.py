"""Compares a Hugging Face export of switchyard with switchyard itself.

  compare.py logits FOLDER LOGITS_JSON TEXT EVAL_LOSS
      loads FOLDER with transformers (AutoModelForCausalLM, fp32, eager
      attention), runs the first window of LOGITS_JSON's tokens and every
      window of TEXT (bytes, windows of seq_len + 1 without overlap, as
      `switchyard eval`), and prints JSON: the largest logit difference
      relative to the largest logit, and both mean cross-entropies.
  compare.py make KIND FOLDER
      writes a small random transformers model (KIND: llama, qwen3, mixtral,
      qwen2_moe, qwen3_moe; vocab 256 so byte text fits) to FOLDER with save_pretrained,
      no downloads.
  compare.py same FOLDER_A FOLDER_B
      prints JSON: whether both folders hold the same tensor names, and the
      largest difference relative to the largest value.
  compare.py bpe TEXT OUT
      trains a byte-level BPE tokenizer of 300 tokens on TEXT with the
      `tokenizers` library and saves it as OUT (a tokenizer.json).
  compare.py encode FOLDER TEXT
      loads FOLDER's tokenizer with AutoTokenizer and prints JSON: the ids
      of TEXT's first 200 characters and the tokenizer's class.
  compare.py tensor FOLDER NAME
      prints JSON: the shape of tensor NAME in FOLDER and its largest
      absolute value.
"""
import glob
import json
import sys

try:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
except ImportError as e:
    sys.exit(f"compare.py needs torch and transformers ({e}): ./ci.sh installs them "
             "(pip install torch==2.5.1 transformers==4.57.6)")


def logits(folder, dump_path, text_path, eval_loss):
    dump = json.load(open(dump_path))
    t, v = dump["seq_len"], dump["vocab"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ours = torch.tensor(dump["logits"], dtype=torch.float32).view(t, v)
    with torch.no_grad():
        theirs = model(torch.tensor([dump["tokens"][:t]])).logits[0].float()
        data = list(open(text_path, "rb").read())
        windows = [data[i * t:i * t + t + 1] for i in range((len(data) - 1) // t)]
        total, count = 0.0, 0
        for w in windows:
            out = model(torch.tensor([w[:t]])).logits[0].float()
            total += torch.nn.functional.cross_entropy(out, torch.tensor(w[1:]), reduction="sum").item()
            count += t
    print(json.dumps({
        "max_abs_diff": (theirs - ours).abs().max().item(),
        "max_rel_diff": ((theirs - ours).abs().max() / ours.abs().max()).item(),
        "hf_loss": total / count,
        "switchyard_loss": float(eval_loss),
        "windows": len(windows),
        "architecture": model.config.architectures[0],
    }))


def tensors(folder):
    out = {}
    for f in sorted(glob.glob(f"{folder}/*.safetensors")):
        out.update(load_file(f))
    return out


def same(a, b):
    ta, tb = tensors(a), tensors(b)
    names = sorted(ta) == sorted(tb)
    worst = 0.0
    for name in ta.keys() & tb.keys():
        scale = max(ta[name].abs().max().item(), 1e-30)
        worst = max(worst, (ta[name] - tb[name]).abs().max().item() / scale)
    print(json.dumps({"same_names": names, "tensors": len(ta), "max_rel_diff": worst}))


def make(kind, folder):
    from transformers import AutoConfig
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, initializer_range=0.2)
    if kind == "llama":
        config = AutoConfig.for_model("llama", intermediate_size=48, **common)
    elif kind == "qwen3":
        config = AutoConfig.for_model("qwen3", intermediate_size=48, head_dim=8, attention_bias=False,
                                      use_sliding_window=False, **common)
    elif kind == "qwen3_moe":
        common.update(num_hidden_layers=3)
        config = AutoConfig.for_model("qwen3_moe", intermediate_size=56, moe_intermediate_size=24, num_experts=6,
                                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                                      head_dim=8, attention_bias=False, use_sliding_window=False, **common)
    elif kind == "mixtral":
        config = AutoConfig.for_model("mixtral", intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None, **common)
    elif kind == "qwen2_moe":
        common.update(num_hidden_layers=3)
        config = AutoConfig.for_model("qwen2_moe", intermediate_size=56, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                                      norm_topk_prob=False, mlp_only_layers=[0], use_sliding_window=False, **common)
    else:
        sys.exit(f"unknown kind {kind}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()  # switchyard's attention has no biases
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    print(json.dumps({"architecture": config.architectures[0] if config.architectures else type(model).__name__}))


def bpe(text, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([text], trainer)
    tok.save(out)
    print(json.dumps({"vocab": tok.get_vocab_size()}))


def encode(folder, text):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(open(text, encoding="utf-8").read()[:200])["input_ids"]
    print(json.dumps({"ids": ids, "class": type(tok).__name__}))


def tensor(folder, name):
    t = tensors(folder)[name]
    print(json.dumps({"shape": list(t.shape), "max_abs": t.abs().max().item()}))


if __name__ == "__main__":
    if sys.argv[1] == "tensor":
        tensor(*sys.argv[2:4])
    elif sys.argv[1] == "bpe":
        bpe(*sys.argv[2:4])
    elif sys.argv[1] == "encode":
        encode(*sys.argv[2:4])
    elif sys.argv[1] == "logits":
        logits(*sys.argv[2:6])
    elif sys.argv[1] == "make":
        make(*sys.argv[2:4])
    else:
        same(*sys.argv[2:4])
