"""
Settings for every script, nanoGPT style: each script keeps its settings as plain
module globals at the top, then calls configure(globals()). That applies, in order,

    python SCRIPT.py config/some_run.py --key=value --other_key=value

a config file (Python, run with the script's settings in scope: config files are
code, so only run ones you trust), then each --key=value. A key that the script
does not have, or a value of the wrong type, ends the program with one clear line
and exit code 2 -- a typo never silently trains the wrong model. A setting whose
default is "auto" (train.py's compile) also takes True and False.

--help (or -h) prints every setting with its value after the config file and flags
before it, and the comment beside it in the script, grouped as in the script; then exits 0.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import sys
import textwrap
import tokenize

SETTING_TYPES = (bool, int, float, str, type(None))


def fail(message):
    """A user error: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _nearest(key, known):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key, value, default, source):
    """Check value against the type of the setting's default; ints are fine for floats."""
    if default is None or type(value) is type(default):
        return value
    if default == "auto" and type(value) is bool:
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    fail(f"{source}: {key} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")


def _parse_value(raw, default):
    if default == "auto" and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if isinstance(default, str):
        return raw  # strings are taken as typed: --start=123 is the text "123"
    if isinstance(default, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # not a Python literal: left as text, and the type check says so


def settings_of(scope):
    """The settings among a script's globals (or a config file's names): {name: value} of the plain
    values (bool, int, float, str, None) whose names do not start with an underscore."""
    return {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, SETTING_TYPES)}


def configure(settings, argv=None, given=None):
    """Apply a config file and --key=value overrides onto `settings` (a script's globals()).

    Returns the settings as a plain dict, ready to be stored in a checkpoint. given, if a set,
    gets the names of the settings the config file assigns and the flags set, whatever their
    values: the ones a user chose, which nothing else (a run fine-tuned from) may override.
    """
    given = set() if given is None else given
    argv = sys.argv[1:] if argv is None else argv
    known = sorted(settings_of(settings))
    wants_help = any(arg in ("--help", "-h") for arg in argv)
    auto = {k for k in known if settings[k] == "auto"}  # these stay "auto" or a bool, whatever was set before

    def typed_like(key):  # what a new value of key is checked against
        return "auto" if key in auto else settings[key]

    for arg in argv:
        if arg in ("--help", "-h"):
            continue
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                fail(f"config file not found: {arg}")
            scope = {k: settings[k] for k in known}
            try:
                with open(arg) as f:
                    tree = ast.parse(f.read(), arg)
                exec(compile(tree, arg, "exec"), scope)
            except Exception as e:  # a config file is user code: whatever it raises is a user error
                fail(f"config file {arg} failed: {type(e).__name__}: {e}")
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            given.update(key for key in known if key in assigned or scope[key] is not settings[key])
            for key, value in scope.items():
                if key.startswith("_") or key in known and value is settings[key]:
                    continue
                if key not in known:
                    if isinstance(value, SETTING_TYPES):
                        fail(f"{arg}: unknown setting '{key}'{_nearest(key, known)}")
                    continue  # imports and helper objects in a config file are fine
                settings[key] = _coerce(key, value, typed_like(key), arg)
        else:
            key, eq, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in known:
                fail(f"unknown setting '--{key}'{_nearest(key, known)}")
            if not eq:
                if not isinstance(typed_like(key), bool):
                    fail(f"--{key} needs a value: --{key}=...")
                raw = "True"
            settings[key] = _coerce(key, _parse_value(raw, typed_like(key)), typed_like(key), f"--{key}")
            given.add(key)
    for key in known:
        if isinstance(settings[key], str) and "\0" in settings[key]:
            fail(f"{key} contains a NUL byte")
    if wants_help:
        print_help(settings, known)
        sys.exit(0)
    return {k: settings[k] for k in known}


def _within(value, rule):
    """Does value obey rule: '>= 1', '> 0', or an interval like '[0, 1)' or '(0, 1]'?"""
    if rule[0] in "[(":
        low, high = (float(x) for x in rule[1:-1].split(","))
        return ((value >= low) if rule[0] == "[" else (value > low)) and \
               ((value <= high) if rule[-1] == "]" else (value < high))
    op, bound = rule.split()
    return {">=": value >= float(bound), ">": value > float(bound)}[op]


def check_ranges(settings, rules):
    """Each setting named in rules ({name: '>= 1' | '> 0' | '[0, 1)' ...}) must be a finite number
    obeying its rule; the first that is not ends the program with one clear line."""
    for name, rule in rules.items():
        value = settings[name]
        if not (math.isfinite(value) and _within(value, rule)):
            fail(f"{name} must be {'in ' if rule[0] in '[(' else ''}{rule}, got {value!r}")


# ----------------------------------------------------------------------------------
# --help: the settings as the script's source lists them

def _comments(source):
    """{line number: the comment on that line}, and the set of lines that are only a comment."""
    found, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                alone.add(tok.start[0])
    return found, alone


def _help_rows(settings, known):
    """[(heading, [(name, comment), ...]), ...] in the order of the script's source: each setting
    at its first assignment, under the comment line above it. Settings that come from a
    dataclass's fields (the model's) are listed where the script brings them in, with the
    comments beside the fields in the dataclass."""
    path = settings.get("__file__")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return [("settings", [(name, "") for name in known])]
    comments, alone = _comments(source)
    classes = [v for v in settings.values() if isinstance(v, type) and dataclasses.is_dataclass(v)]
    events, placed = [], set()  # (line, heading or None, name, comment)
    for line in sorted(alone):
        if comments[line].strip("-= "):  # a heading, not a ruler
            events.append((line, comments[line], None, None))
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name) and target.id in known and target.id not in placed:
                    placed.add(target.id)
                    events.append((stmt.lineno, None, target.id, comments.get(stmt.lineno, "")))
        mentioned = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        for cls in [c for c in classes if c.__name__ in mentioned]:
            classes.remove(cls)
            field_comments = _field_comments(cls)
            for field in dataclasses.fields(cls):
                if field.name in known and field.name not in placed:
                    placed.add(field.name)
                    events.append((stmt.lineno, None, field.name, field_comments.get(field.name, "")))
    rows, heading = [], "settings"
    for _, title, name, comment in sorted(events, key=lambda e: (e[0], e[2] is not None)):
        if title is not None:
            heading = title
        elif rows and rows[-1][0] == heading:
            rows[-1][1].append((name, comment))
        else:
            rows.append((heading, [(name, comment)]))
    rest = [(name, "") for name in known if name not in placed]
    return rows + ([("other", rest)] if rest else [])


def _field_comments(cls):
    """{field: the comment beside it} in a dataclass's source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments, _ = _comments(source)
    return {stmt.target.id: comments.get(stmt.lineno, "") for stmt in ast.parse(source).body[0].body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


def _as_flag(name, value):
    return f"--{name}={value if isinstance(value, str) else repr(value)}"


def print_help(settings, known):
    """The script's docstring, then every setting as --key=value with its current value (after the
    config file and flags before --help) and the comment beside it, grouped as in the file."""
    script = os.path.basename(settings.get("__file__") or sys.argv[0])
    lines = [f"usage: python {script} [config/file.py ...] [--key=value ...]"]
    if settings.get("__doc__"):
        lines += ["", settings["__doc__"].strip()]
    for heading, entries in _help_rows(settings, known):
        lines += ["", f"{heading}:"]
        width = min(40, max(len(_as_flag(name, settings[name])) for name, _ in entries))
        for name, comment in entries:
            flag = _as_flag(name, settings[name])
            lines.append(f"  {flag:<{width}}  {comment}" if comment else f"  {flag}")
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # read by `head`, say: what it did not read is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ----------------------------------------------------------------------------------
# The model's settings (model.py builds the model from them). Here, where torch is not imported,
# so that train.py and bench.py, whose settings include every field, answer --help without it.

ARCHS = ("gpt", "conditional", "encoder", "encdec", "lstm")
OPTIMIZERS = ("adamw", "sgd", "lion", "muon")  # Model.configure_optimizer's kinds
POOLS = ("first", "last", "mean")  # the state a classification head reads


@dataclasses.dataclass
class ModelConfig:
    arch: str = "gpt"          # gpt | conditional | encoder | encdec | lstm; each trains on its own objective
    vocab_size: int = 8192     # rows of the embedding (train.py: the tokenizer's, rounded up to 64)
    block_size: int = 1024     # longest context the model sees (each side, for encdec)
    n_layer: int = 12          # blocks (for encdec: on each side), or LSTM layers
    n_head: int = 12           # attention heads
    n_kv_head: int = 0         # key/value heads; 0 = n_head (plain multi-head attention)
    n_embd: int = 768          # width of the residual stream; also the LSTM's embedding and hidden size
    dropout: float = 0.0       # on embeddings, attention weights and residual branches
    bias: bool = False         # bias in Linear and LayerNorm layers
    pos: str = "learned"       # learned | sinusoidal | rope | alibi
    norm: str = "layernorm"    # layernorm | rmsnorm
    norm_first: bool = True    # pre-norm blocks; False = post-norm (normalize after each residual add)
    norm_eps: float = 0.0      # the norms' epsilon; 0 = PyTorch's default (layernorm 1e-5, rmsnorm the dtype's eps)
    mlp: str = "gelu"          # gelu | gelu_tanh | swiglu
    mlp_hidden: int = 0        # the MLP's inner width; 0 = 4 x n_embd (gelu), ~8/3 x n_embd (swiglu)
    attention: str = "sdpa"    # sdpa (softmax) | linear (kernelized; self-attention only)
    n_expert: int = 0          # > 0: a mixture of this many experts replaces every MLP
    expert_top_k: int = 1      # experts each token is sent to
    expert_capacity: float = 1.25  # in training an expert takes at most this x its fair share of tokens
    balance_weight: float = 0.01   # weight of the experts' load-balancing loss in the loss
    n_labels: int = 0          # conditional: how many control labels there are (train.py: the dataset's)
    tie_embeddings: bool = True    # the head reuses the token embedding's matrix
    rope_theta: float = 10000.0    # rope: the base of its rotation frequencies
    head: str = "softmax"      # softmax | adaptive (adaptive softmax: rarer tokens in smaller clusters; untied)
    adaptive_cutoffs: str = ""  # adaptive: token ids where the clusters start, e.g. "2000,10000"; "" = V/25, V/5
    n_classes: int = 0         # > 0: a classification head on a pooled final state (train.py --task=classify)
    pool: str = "mean"         # the state the classification head reads: first | last (token) | mean (of the tokens)

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        choices = {"arch": ARCHS, "pos": ("learned", "sinusoidal", "rope", "alibi"),
                   "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "gelu_tanh", "swiglu"),
                   "attention": ("sdpa", "linear")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be 0 (the default width) or positive, got {self.mlp_hidden}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps < 0:
            raise ValueError(f"norm_eps must be 0 (the default) or positive, got {self.norm_eps}")
        if self.head not in ("softmax", "adaptive"):
            raise ValueError(f"head={self.head!r} is not one of softmax, adaptive")
        if self.head == "adaptive":
            self.cutoffs()  # checked now, not at the first forward
            if self.tie_embeddings:
                raise ValueError("head='adaptive' has its own output matrices, one per cluster: "
                                 "set tie_embeddings=False")
        if self.n_classes < 0 or self.pool not in POOLS:
            raise ValueError(f"need n_classes >= 0 and pool one of {', '.join(POOLS)}, got n_classes={self.n_classes}, "
                             f"pool={self.pool!r}")
        if self.n_classes and self.arch == "conditional":
            raise ValueError("arch='conditional' reads a control label with every token; classify with a gpt, "
                             "encoder, encdec or lstm model")
        if self.n_classes and self.pool == "first" and self.arch in ("gpt", "lstm"):
            raise ValueError(f"pool='first' reads the first token's state, which in a causal arch={self.arch!r} "
                             "model has seen only that token: use pool='last' or 'mean'")
        if self.arch == "conditional" and self.n_labels <= 0:
            raise ValueError("arch='conditional' needs n_labels > 0 control labels (train.py counts them in a "
                             "dataset prepared with --labels=True)")
        if self.arch == "lstm":
            if self.n_expert:
                raise ValueError("n_expert (mixture of experts) replaces a transformer's MLP; arch='lstm' has none")
            return  # heads, positions and attention do not apply to an LSTM
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size (n_embd / n_head)")
        if self.pos == "alibi" and self.attention == "linear":
            raise ValueError("pos='alibi' biases softmax scores, which attention='linear' does not compute")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.expert_top_k <= self.n_expert):
            raise ValueError(f"need n_expert >= 0 and 1 <= expert_top_k <= n_expert, got "
                             f"n_expert={self.n_expert}, expert_top_k={self.expert_top_k}")
        if self.expert_capacity <= 0 or self.balance_weight < 0:
            raise ValueError("expert_capacity must be positive and balance_weight not negative")

    def cutoffs(self):
        """The adaptive head's cutoffs: increasing token ids in (0, vocab_size), each starting a cluster
        (the ids are taken as ordered by frequency, as a BPE's merges roughly are)."""
        text = self.adaptive_cutoffs or f"{max(1, self.vocab_size // 25)},{max(2, self.vocab_size // 5)}"
        try:
            cutoffs = [int(c) for c in text.split(",")]
        except ValueError:
            raise ValueError(f"adaptive_cutoffs={text!r} is not a comma-separated list of token ids") from None
        if not all(a < b for a, b in zip([0] + cutoffs, cutoffs)) or cutoffs[-1] >= self.vocab_size:
            raise ValueError(f"adaptive_cutoffs={text!r} must increase, each between 0 and the vocabulary's "
                             f"{self.vocab_size} (exclusive)")
        return cutoffs

    @classmethod
    def from_settings(cls, settings):
        """The model's fields picked out of a script's settings (or a checkpoint's model_args)."""
        return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})
