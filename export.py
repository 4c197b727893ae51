"""
Export a trained run for other tools: the Hugging Face layout, or ONNX.

    python export.py --out_dir=out-legal-small --format=hf --to=hf-legal-small
    python export.py --out_dir=out-legal-small --format=onnx --to=legal-small.onnx

hf: a folder that transformers loads as it is (AutoModelForCausalLM, AutoTokenizer):
config.json, model.safetensors, generation_config.json, tokenizer.json and
tokenizer_config.json, plus our own tokenizer files (nanolex_tokenizer.json and its data
file), so that train.py --init_from=hf:DIR and sample.py --out_dir=hf:DIR get back the very
run. A gpt run whose switches are GPT-2's (learned positions, layernorm, gelu) or Llama's
(rope, rmsnorm, swiglu, grouped-query attention) exports; other switches are refused by name.
The weight mapping lives in runtime.py.

onnx: the decoder's forward, token ids (batch, length) -> logits (batch, length, vocab),
both dimensions dynamic (length up to block_size), through torch.onnx.export(dynamo=True).
No KV cache: each call reads the whole sequence (see docs/export.md).

The target is written whole or not at all (a temporary file or folder, renamed into place);
an existing, non-empty target is replaced only with --force.
"""

import logging
import os
import shutil
import sys
import warnings

# -----------------------------------------------------------------------------
out_dir = "out"             # the run to export (a directory with ckpt.pt), or hf:DIR (a Hugging Face folder)
format = "hf"               # hf: a Hugging Face model folder | onnx: one .onnx file
to = ""                     # where: the folder (hf) or the file (onnx)
force = False               # replace a target that exists and is not empty
# -----------------------------------------------------------------------------
from configurator import configure, fail  # noqa: E402
configure(globals())

if format not in ("hf", "onnx"):
    fail(f"format={format!r} is not one of hf, onnx")
if not to:
    fail(f"say where to write the export: --to={'DIR' if format == 'hf' else 'FILE.onnx'}")
if os.path.exists(to) and not force and (not os.path.isdir(to) or os.listdir(to)):
    fail(f"{to} exists and is not empty: choose another --to, or replace it with --force")
if format == "hf" and os.path.isfile(to):
    fail(f"{to} is a file; format=hf writes a folder")
if format == "onnx" and os.path.isdir(to):
    fail(f"{to} is a directory; format=onnx writes one file")

import torch  # noqa: E402

from runtime import layout, load_run, to_hf  # noqa: E402

try:
    model, tokenizer, ckpt = load_run(out_dir, "cpu")
except ValueError as e:
    fail(str(e))
if ckpt.get("lora"):  # the adapters sit beside the layers they adapt: neither layout has a place for them
    fail(f"{out_dir} is a LoRA run with unmerged adapters: fold them in first with "
         f"python train.py --merge_lora={out_dir} --out_dir=MERGED, then export MERGED")
model.float().eval()


def replace_with(tmp, target):
    """tmp (a complete file or folder) becomes target; whatever target was is gone only then."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.lexists(target):
        os.replace(target, old)
    os.replace(tmp, target)
    if os.path.isdir(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)


def write_folder(target, files):
    """files ({name: bytes}) as the folder target, atomically: all of them or none."""
    tmp = f"{target.rstrip(os.sep)}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        replace_with(tmp, target.rstrip(os.sep))
    except OSError as e:
        fail(f"cannot write {target}: {e.strerror or e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Logits(torch.nn.Module):
    """ids (B, T) -> logits at every position (B, T, vocab): what the ONNX graph computes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model.lm_head(self.model.hidden(idx))


def export_onnx(target):
    try:
        layout(model.config)  # the runs the Hugging Face layout takes, GPT-2's or Llama's switches
    except ValueError as e:
        fail(str(e))
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter translates through it)
    except ImportError:
        fail("format=onnx needs onnx and onnxscript: pip install onnx==1.23.2 onnxscript==0.7.2")
    batch, length = torch.export.Dim("batch", max=4096), torch.export.Dim("length", max=model.config.block_size)
    example = torch.randint(0, tokenizer.vocab_size, (2, min(8, model.config.block_size)))
    tmp = f"{target}.tmp-{os.getpid()}"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # not its notes on operators this model has none of
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(Logits(model).eval(), (example,), dynamo=True, input_names=["input_ids"],
                                        output_names=["logits"], dynamic_shapes={"idx": {0: batch, 1: length}},
                                        verbose=False)
        program.save(tmp)
        replace_with(tmp, target)
    except OSError as e:
        fail(f"cannot write {target}: {e.strerror or e}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


if format == "hf":
    try:
        files = to_hf(model, tokenizer)
    except ValueError as e:
        fail(str(e))
    write_folder(to, files)
    print(f"wrote {to}: {', '.join(sorted(files))}")
else:
    export_onnx(to)
    print(f"wrote {to}: ids (batch, length <= {model.config.block_size}) -> logits (batch, length, "
          f"{model.config.vocab_size})")
sys.stdout.flush()
