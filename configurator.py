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
