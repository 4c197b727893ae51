"""
Pictures of runs: training curves, attention maps, a map of document embeddings, and the
report of a run (report.md).

    python plot.py out-legal-small [out-other ...]      # curves.png and curves.svg, written into each run
    python plot.py --report out-legal-small             # report.md (and its curves) in the run; train.py
                                                        # writes it at the end of training
    python plot.py --attention out-legal-small --start="The Licensee shall"   # attention.png
    python plot.py --embeddings out-legal-small --input=docs/                 # embeddings.png

Curves: the train and val loss, and val bits per byte, against iterations, tokens seen and
wall time; tokens/s, MFU, the learning rate, the gradient norm and peak memory against
iterations. Several runs are drawn over each other, each under its directory's name, and
the same picture is written into every one of them. Everything comes from log.jsonl
(run.json adds the tokens per iteration); wall time is summed over resumes.

Attention: every head of every layer as a heat map over the tokens of start (for the
transformer architectures with softmax attention). The weights are computed from each
attention layer's own q and k, since the fast path (scaled_dot_product_attention) does
not hand them out.

Embeddings: each document of input (files, folders, globs, or a .jsonl with "text" and
"label") embedded as sample.py --embed does, then projected on its two principal
components, coloured by the folder it is in (or its label).
"""

import datetime
import json
import math
import os
import shutil
import statistics
import sys

# -----------------------------------------------------------------------------
report = False              # write report.md into the run (with its curves)
attention = False           # heat maps of each head's attention over start's tokens (transformer runs)
start = "The Licensee shall not assign this Agreement"  # --attention: the text (or FILE:path)
max_tokens = 32             # --attention: at most this many tokens of start (more are unreadable)
embeddings = False          # a 2-D PCA map of the documents of input, coloured by folder or label
input = ""                  # --embeddings: files, folders or globs, comma-separated, or a .jsonl file
device = "cpu"              # --attention, --embeddings: where the model runs (auto | cpu | cuda | mps)
# -----------------------------------------------------------------------------
RUNS = [arg for arg in sys.argv[1:] if not arg.startswith("-") and not arg.endswith(".py")]
from configurator import configure, fail  # noqa: E402
config = configure(globals(), [arg for arg in sys.argv[1:] if arg not in RUNS])

if not RUNS:
    fail("name a run directory: python plot.py RUN [RUN ...] (see --help)")
if sum((report, attention, embeddings)) > 1:
    fail("--report, --attention and --embeddings each take a run of their own: use one at a time")
if (report or attention or embeddings) and len(RUNS) > 1:
    fail(f"--report, --attention and --embeddings take one run, not {len(RUNS)}")
if embeddings and not input:
    fail("--embeddings needs --input=FILES (files, folders or globs, or a .jsonl file)")
if max_tokens < 2:
    fail(f"max_tokens must be at least 2, got {max_tokens}")

try:
    import matplotlib
except ImportError:
    fail("plot.py needs matplotlib: pip install matplotlib==3.11.2")
matplotlib.use("Agg")  # files only, no window: works on a server
import matplotlib.pyplot as plt  # noqa: E402


# ---- reading runs -------------------------------------------------------------

def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_run(path):
    """A run directory's log and what train.py noted about it: {"name", "path", "train": records of
    training steps, "evals": records of evaluations, "info": run.json or {}}. Each record gets "wall":
    seconds since the run began, summed over resumes (elapsed_s starts again at 0 in a resumed run)."""
    log_path = os.path.join(path, "log.jsonl")
    if not os.path.isdir(path):
        fail(f"{path} is not a directory")
    if not os.path.isfile(log_path):
        fail(f"{path} is no run: it has no log.jsonl (train.py writes one)")
    records = []
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(r, dict) and isinstance(r.get("iter"), int):
                records.append(r)
    offset = previous = 0.0
    for r in records:
        elapsed = r["elapsed_s"] if is_number(r.get("elapsed_s")) else previous
        if elapsed < previous:  # a resumed run's clock started again
            offset += previous
        r["wall"], previous = offset + elapsed, elapsed
    run = {"name": os.path.basename(os.path.normpath(os.path.abspath(path))), "path": path,
           "train": [r for r in records if "val_loss" not in r and is_number(r.get("loss"))],
           "evals": [r for r in records if is_number(r.get("val_loss"))], "info": {}}
    if not run["train"] and not run["evals"]:
        fail(f"{log_path} has no numbers to plot: no record with a loss")
    try:
        with open(os.path.join(path, "run.json")) as f:
            run["info"] = json.load(f)
    except (OSError, ValueError):
        pass  # a run from before run.json: the curves need only the log
    return run


def series(records, key, x="iter", tokens_per_iter=None):
    """(xs, ys) of the records that have a number under key; x is "iter", "tokens" or "wall"."""
    xs, ys = [], []
    for r in records:
        if is_number(r.get(key)):
            xs.append(r["iter"] * tokens_per_iter if x == "tokens" else r[x])
            ys.append(r[key])
    return xs, ys


def smooth(ys):
    """A running mean over ~2% of the points: the trend of a noisy train loss."""
    w = max(1, len(ys) // 50)
    return [statistics.fmean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]


# ---- curves -------------------------------------------------------------------

AXES = {"iter": "iteration", "tokens": "tokens seen", "wall": "wall time (s)"}


def plot_curves(runs):
    """One figure of every curve for all runs, overlaid; returns the figure."""
    fig, axes = plt.subplots(4, 3, figsize=(15, 16))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.94, wspace=0.2, hspace=0.3)  # (a layout engine costs
    # more time than the drawing)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # two runs named alike: tell them apart by their paths
        names = [r["path"] for r in runs]
    for run, name, colour in zip(runs, names, colours * len(runs)):
        per_iter = run["info"].get("tokens_per_iter")
        for col, x in enumerate(AXES):
            if x == "tokens" and not per_iter:
                continue  # no run.json: the tokens per iteration are not known
            ax = axes[0][col]
            xs, ys = series(run["train"], "loss", x, per_iter)
            if xs:
                ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth(ys), color=colour, label=f"{name} train")
            xs, ys = series(run["evals"], "val_loss", x, per_iter)
            ax.plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=3, label=f"{name} val")
            xs, ys = series(run["evals"], "val_bpb", x, per_iter)
            axes[1][col].plot(xs, ys, color=colour, marker="o", markersize=3, label=name)
        for ax, key, scale in ((axes[2][0], "tok_per_s", 1), (axes[2][1], "mfu", 100), (axes[2][2], "lr", 1),
                               (axes[3][0], "grad_norm", 1), (axes[3][1], "peak_mem_mb", 1)):
            xs, ys = series(run["train"], key)
            ax.plot(xs, [y * scale for y in ys], color=colour, label=name)
    titles = [[f"loss vs {AXES[x]}" for x in AXES], [f"val bits per byte vs {AXES[x]}" for x in AXES],
              ["tokens/s", "MFU (%)", "learning rate"], ["gradient norm (before clipping)", "peak memory (MB)", None]]
    for row, row_titles in zip(axes, titles):
        for col, (ax, title) in enumerate(zip(row, row_titles)):
            if title is None:
                ax.axis("off")
                continue
            ax.set_title(title)
            ax.set_xlabel(list(AXES.values())[col] if title.endswith(tuple(AXES.values())) else "iteration")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not in the log", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(", ".join(names))
    return fig


def save(fig, paths, ext):
    """fig drawn once as ext, written into each of paths, atomically (temporary file, rename)."""
    for i, path in enumerate(paths):
        if i == 0:
            fig.savefig(path + ".tmp", format=ext, dpi=100)
        else:
            shutil.copyfile(paths[0], path + ".tmp")
        os.replace(path + ".tmp", path)


def write_curves(runs, formats=("png", "svg")):
    """curves.png (and .svg) of all runs into each run's directory; returns the PNG paths."""
    fig = plot_curves(runs)
    for ext in formats:
        save(fig, [os.path.join(run["path"], f"curves.{ext}") for run in runs], ext)
    plt.close(fig)
    return [os.path.join(run["path"], "curves.png") for run in runs]


# ---- a run's model: attention and embeddings ------------------------------------

def load_engine(path):
    from engine import Engine  # torch only here: curves and reports do without it
    try:
        return Engine.load(path, device=device, dtype="float32")
    except ValueError as e:
        fail(str(e))


def attention_weights(model, idx):
    """[(layer name, weights (n_head, T, T))] of every softmax self-attention layer that runs on idx
    (1, T) in model.hidden(idx), in order: Attention.weights() of what each layer is given."""
    import torch
    from model import Attention
    found = []

    def keep(module, args):  # Block calls attn(x, rope, mask, is_causal, cache, layer)
        with torch.no_grad():
            found.append((f"layer {len(found)}", module.weights(*args[:4])[0].cpu()))

    layers = [m for m in model.modules() if type(m) is Attention]  # not cross- or linear attention
    hooks = [m.register_forward_pre_hook(keep) for m in layers]
    try:
        with torch.no_grad():
            model.hidden(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def token_label(tokenizer, t):
    text = tokenizer.decode([t])
    return text.replace("\n", "\\n").replace(" ", "\u2423") or f"<{t}>"  # a visible space


def plot_attention(path):
    engine = load_engine(path)
    config = engine.model.config
    if config.arch == "lstm" or config.attention != "sdpa":
        fail(f"{path} is a{'n lstm' if config.arch == 'lstm' else ' linear-attention'} run: "
             "attention maps need softmax attention (gpt, conditional, encoder, encdec)")
    text = start
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            fail(f"cannot read the --start file {text[5:]}: {e.strerror}")
    ids = engine.tokenizer.encode(text)[:min(max_tokens, config.block_size)]
    if len(ids) < 2:
        fail(f"start={start!r} is {len(ids)} token(s): attention needs at least 2")
    import torch
    weights = attention_weights(engine.model, torch.tensor([ids], device=engine.device))
    labels = [token_label(engine.tokenizer, t) for t in ids]
    n_layer, n_head = len(weights), weights[0][1].size(0)
    cell = max(2.2, 0.12 * len(ids))
    fig, axes = plt.subplots(n_layer, n_head, figsize=(cell * n_head + 2, cell * n_layer + 1), squeeze=False,
                             layout="constrained")
    for row, (layer, w) in zip(axes, weights):
        for head, ax in enumerate(row):
            image = ax.imshow(w[head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{layer}, head {head}", fontsize=9)
            ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(ids)), labels, fontsize=6)
    side = "encoder " if config.arch == "encdec" else ""
    fig.suptitle(f"{os.path.basename(os.path.abspath(path))}: {side}attention of each head (rows: queries, "
                 f"columns: keys), {len(ids)} tokens")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    out = os.path.join(path, "attention.png")
    save(fig, [out], "png")
    plt.close(fig)
    return out


def plot_embeddings(path):
    from engine import read_documents
    try:
        docs = read_documents(input)
    except ValueError as e:
        fail(f"--input={input}: {e}")
    if len(docs) < 3:
        fail(f"--input={input} has {len(docs)} document(s): a map needs at least 3")
    engine = load_engine(path)
    vectors = engine.embed([text for _, text, _ in docs]).float()  # (N, C)
    import torch
    centred = vectors - vectors.mean(dim=0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).cpu()  # (N, 2): the two principal components
    share = (s[:2] ** 2 / (s ** 2).sum().clamp(min=1e-12)).tolist()
    labels = [label or "(no label)" for _, _, label in docs]
    fig, ax = plt.subplots(figsize=(8, 7))
    for label in sorted(set(labels)):
        rows = [i for i, lab in enumerate(labels) if lab == label]
        ax.scatter(xy[rows, 0].numpy(), xy[rows, 1].numpy(), s=18, label=f"{label} ({len(rows)})")
    ax.set_xlabel(f"principal component 1 ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"principal component 2 ({share[1]:.0%} of the variance)")
    ax.set_title(f"{os.path.basename(os.path.abspath(path))}: {len(docs)} documents of {input}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(path, "embeddings.png")
    save(fig, [out], "png")
    plt.close(fig)
    return out


# ---- report.md ------------------------------------------------------------------

def fmt(x, digits=4):
    if not is_number(x):
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}"


def duration(seconds):
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def write_report(run):
    """report.md in the run directory: what a colleague needs to judge the run at a glance."""
    info, train, evals = run["info"], run["train"], run["evals"]
    write_curves([run], formats=("png",))  # the picture the report shows
    last_eval = evals[-1] if evals else {}
    best = min(evals, key=lambda r: r["val_loss"]) if evals else {}
    iters = max(r["iter"] for r in train + evals)
    per_iter = info.get("tokens_per_iter")
    wall = max(r["wall"] for r in train + evals)
    speeds = [r["tok_per_s"] for r in train if is_number(r.get("tok_per_s"))]
    mfus = [r["mfu"] for r in train if is_number(r.get("mfu"))]
    peaks = [r["peak_mem_mb"] for r in train if is_number(r.get("peak_mem_mb"))]
    meta = {}
    try:
        with open(os.path.join(run["path"], "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        pass
    args = info.get("model_args", {})
    lines = [f"# {run['name']}", "",
             f"Report of the run in `{run['path']}`, written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} "
             "by `plot.py --report`.", "", "## Results", "", "| | |", "| --- | --- |",
             f"| iterations | {iters:,} |",
             f"| tokens seen | {f'{iters * per_iter:,}' if per_iter else '-'} |",
             f"| train loss (last logged step) | {fmt(train[-1]['loss']) if train else '-'} |",
             f"| val loss (last eval, iteration {last_eval.get('iter', '-')}) | {fmt(last_eval.get('val_loss'))} |",
             f"| val bits per byte (last eval) | {fmt(last_eval.get('val_bpb'))} |",
             f"| val accuracy (last eval) | {fmt(last_eval.get('val_accuracy'))} |",
             f"| best val loss (iteration {best.get('iter', '-')}) | {fmt(best.get('val_loss'))} |",
             f"| wall time | {duration(wall)} |",
             f"| tokens/s (median of the logged steps) | {fmt(statistics.median(speeds), 0) if speeds else '-'} |",
             f"| MFU (median) | {f'{100 * statistics.median(mfus):.2f}%' if mfus else '-'} |",
             f"| peak memory (rank 0) | {f'{max(peaks):,.0f} MB' if peaks else '-'} |",
             "", "![curves](curves.png)", "", "## Model", ""]
    if info:
        lines += [f"`{args.get('arch', 'gpt')}`, {info['parameters']:,} parameters without the "
                  f"embeddings ({info['parameters_with_embeddings']:,} with them): "
                  + ", ".join(f"{k} {args[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
                              if k in args) + ".", ""]
    else:
        lines += ["No run.json in the run directory (a run from before it existed): the model is not described.", ""]
    lines += ["## Data and tokenizer", ""]
    if meta:
        splits = meta.get("splits", {})
        train_tokens = splits.get("train", {}).get("tokens")
        lines += [f"Source: {meta.get('source', '-')}; tokenizer `{meta.get('tokenizer', {}).get('kind', '-')}` "
                  f"of {meta.get('vocab_size', '-')} tokens.", ""]
        lines += ["| split | documents | bytes | tokens |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {s.get('documents', 0):,} | {s.get('bytes', 0):,} | {s.get('tokens', 0):,} |"
                  for name, s in splits.items()]
        if per_iter and train_tokens:
            lines += ["", f"The run saw {iters * per_iter / train_tokens:.1f} times the train split's tokens."]
        lines.append("")
    else:
        lines += ["No meta.json in the run directory.", ""]
    lines += ["## Settings that differ from train.py's defaults", ""]
    changed = info.get("changed")
    if changed:
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(changed.items())]
    else:
        lines.append("None." if changed == {} else "Not recorded (no run.json).")
    lines += ["", "## Machine", ""]
    if info:
        lines.append(f"{info['machine']}; device {info['device']}, {info['dtype']}, "
                     f"{info['world_size']} process(es), compile {info['compile']}; torch {info['torch']}, "
                     f"Python {info['python']}. Run started {info['started']}.")
    else:
        lines.append("Not recorded (no run.json).")
    text = "\n".join(lines) + "\n"
    out = os.path.join(run["path"], "report.md")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(out + ".tmp", out)
    return out


# ---- what to do -----------------------------------------------------------------

if report:
    print(f"wrote {write_report(read_run(RUNS[0]))}")
elif attention:
    read_run(RUNS[0])  # a run directory, with a log: the same check as every other picture
    print(f"wrote {plot_attention(RUNS[0])}")
elif embeddings:
    read_run(RUNS[0])
    print(f"wrote {plot_embeddings(RUNS[0])}")
else:
    for path in write_curves([read_run(path) for path in RUNS]):
        print(f"wrote {path}")
