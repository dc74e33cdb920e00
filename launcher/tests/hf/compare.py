"""Compares a Hugging Face export of switchyard with switchyard itself.

  compare.py logits FOLDER LOGITS_JSON TEXT EVAL_LOSS
      loads FOLDER with transformers (AutoModelForCausalLM, fp32, eager
      attention), runs the first window of LOGITS_JSON's tokens and every
      window of TEXT (bytes, windows of seq_len + 1 without overlap, as
      `switchyard eval`), and prints JSON: the largest logit difference
      relative to the largest logit, and both mean cross-entropies.
  compare.py same FOLDER_A FOLDER_B
      prints JSON: whether both folders hold the same tensor names, and the
      largest difference relative to the largest value.
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
             "(pip install torch==2.5.1 transformers==4.46.3)")


def logits(folder, dump_path, text_path, eval_loss):
    dump = json.load(open(dump_path))
    t, v = dump["seq_len"], dump["vocab"]
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
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


if __name__ == "__main__":
    if sys.argv[1] == "logits":
        logits(*sys.argv[2:6])
    else:
        same(*sys.argv[2:4])
