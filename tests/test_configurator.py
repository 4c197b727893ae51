import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from configurator import configure
from conftest import run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    learning_rate = 6e-4
    n_layer = 12
    compile = True
    out_dir = "out"
    from configurator import configure
    print(json.dumps(configure(globals())))
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def run(script, *args):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          cwd=script.parent, env={**os.environ, "PYTHONPATH": ROOT})


def settings(**values):
    return {"learning_rate": 6e-4, "n_layer": 12, "compile": True, "out_dir": "out", **values}


def test_a_config_file_then_flags_override_the_defaults_in_order(tmp_path):
    cfg = tmp_path / "run.py"
    cfg.write_text("n_layer = 4\nout_dir = 'out-small'\nlearning_rate = 1e-3\n")
    s = settings()
    result = configure(s, [str(cfg), "--n_layer=6", "--compile=False"])
    assert result == {"learning_rate": 1e-3, "n_layer": 6, "compile": False, "out_dir": "out-small"}
    assert s["n_layer"] == 6


def test_strings_are_taken_as_typed_and_ints_are_fine_for_floats():
    s = settings()
    configure(s, ["--out_dir=123", "--learning_rate=1"])
    assert s["out_dir"] == "123" and s["learning_rate"] == 1.0 and isinstance(s["learning_rate"], float)


def test_a_bare_boolean_flag_means_true():
    s = settings(compile=False)
    configure(s, ["--compile"])
    assert s["compile"] is True


def test_a_setting_that_defaults_to_auto_also_takes_true_and_false(tmp_path):
    cfg = tmp_path / "run.py"
    cfg.write_text("compile = False\n")
    s = settings(compile="auto")
    configure(s, [str(cfg)])
    assert s["compile"] is False
    s = settings(compile="auto")
    configure(s, [str(cfg), "--compile=auto"])  # back to auto after a config file's bool
    assert s["compile"] == "auto"
    s = settings(compile="auto")
    configure(s, ["--compile=true"])
    assert s["compile"] is True
    with pytest.raises(SystemExit):  # a number is neither
        configure(s, ["--compile=1"])
    with pytest.raises(SystemExit):  # nor a bare flag: auto is no bool
        configure(settings(compile="auto"), ["--compile"])


def test_a_config_file_may_compute_values_and_import_things(tmp_path):
    cfg = tmp_path / "run.py"
    cfg.write_text("import math\nn_layer = 2 * 3\n")
    s = settings()
    configure(s, [str(cfg)])
    assert s["n_layer"] == 6


@pytest.mark.parametrize("args,message", [
    (["--n_layr=3"], "unknown setting '--n_layr' (did you mean 'n_layer'?)"),
    (["--n_layer=3.5"], "n_layer must be int, got 3.5"),
    (["--compile=maybe"], "compile must be bool"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--n_layer"], "--n_layer needs a value"),
    (["missing_config.py"], "config file not found: missing_config.py"),
])
def test_bad_flags_end_with_one_clear_line_and_exit_code_2(script, args, message):
    done = run(script, *args)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {message}" or message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("body,message", [
    ("n_layers = 4\n", "unknown setting 'n_layers' (did you mean 'n_layer'?)"),
    ("n_layer = '4'\n", "n_layer must be int"),
    ("raise RuntimeError('boom')\n", "failed: RuntimeError: boom"),
    ("n_layer = = 4\n", "failed: SyntaxError"),
])
def test_bad_config_files_end_with_one_clear_line_and_exit_code_2(script, body, message):
    cfg = script.parent / "bad.py"
    cfg.write_text(body)
    done = run(script, str(cfg))
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


# ---- fuzzing: any argument or config file ends in settings of the right types, or in the clear error --

SETTINGS = {"learning_rate": 6e-4, "n_layer": 12, "compile": True, "out_dir": "out", "init_from": None,
            "dtype": "auto"}


def configure_or_exit(argv, capsys):
    """The settings configure() gives, or None after its clear error (exit 2, one line, no traceback)."""
    s = dict(SETTINGS)
    capsys.readouterr()  # the fixture lives across examples: only this one's output
    try:
        configure(s, argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return None
    for key, default in SETTINGS.items():  # every value keeps its setting's type ("auto": or a bool)
        if default is not None:
            assert type(s[key]) is type(default) or default == "auto" and type(s[key]) is bool, (key, s[key])
    return s


@examples(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(SETTINGS) + ["n_layers", "lr", ""]), raw=st.text(max_size=30),
       eq=st.booleans())
def test_any_key_and_value_on_the_command_line_gives_a_setting_or_the_clear_error(key, raw, eq, capsys):
    configure_or_exit([f"--{key}={raw}" if eq else f"--{key}"], capsys)


@examples(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=200),
                      st.lists(st.tuples(st.sampled_from(sorted(SETTINGS) + ["_x", "n_layers", "import os; x"]),
                                         st.sampled_from(["1", "2.5", "'a'", "True", "None", "[1]", "1/0", "(",
                                                          "'\\0'", "float('inf')", "os"])),
                               max_size=4).map(lambda pairs: "\n".join(f"{k} = {v}" for k, v in pairs).encode())))
def test_any_config_file_gives_settings_or_the_clear_error(body, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("cfg") / "config.py"
    path.write_bytes(body)
    configure_or_exit([str(path)], capsys)


# ---- --help -----------------------------------------------------------------------------------

HELP_SCRIPT = textwrap.dedent('''
    """A script that trains something."""
    from dataclasses import dataclass, fields

    @dataclass
    class Shape:
        depth: int = 2       # how many layers
        width: int = 8       # how wide each one is

    # I/O
    out_dir = "out"          # where the run goes
    log_interval = 1
    # -----------------------------------------------------------------
    # shape: every field of Shape
    globals().update({f.name: f.default for f in fields(Shape)})
    # optimizer
    learning_rate = 6e-4     # peak learning rate
    from configurator import configure
    configure(globals())
    print("ran past the settings")
''')


def test_help_lists_every_setting_with_its_value_and_comment_grouped_as_in_the_script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(HELP_SCRIPT)
    config = tmp_path / "small.py"
    config.write_text("width = 32\nlearning_rate = 1e-3\n")
    done = run(path, str(config), "--out_dir=elsewhere", "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert "ran past the settings" not in done.stdout
    lines = [line.rstrip() for line in done.stdout.splitlines()]
    assert "A script that trains something." in lines
    groups = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert groups == ["I/O:", "shape: every field of Shape:", "optimizer:"]
    flat = " ".join(done.stdout.split())
    # values after the config file and the flags; the comment beside each, the dataclass's for its fields
    for expected in ("--out_dir=elsewhere where the run goes", "--log_interval=1", "--depth=2 how many layers",
                     "--width=32 how wide each one is", "--learning_rate=0.001 peak learning rate"):
        assert expected in flat
    assert flat.index("--log_interval") < flat.index("--depth") < flat.index("--learning_rate")


def test_help_still_refuses_a_bad_flag_before_it(script):
    done = run(script, "--n_layers=3", "--help")
    assert done.returncode == 2 and done.stderr.startswith("error: unknown setting '--n_layers'")


@pytest.mark.parametrize("name", ["train.py", "sample.py", "prepare.py", "bench.py"])
def test_every_script_answers_help_with_its_settings_and_exit_code_0(name):
    done = run_in_process(name, "--help")  # what a process of its own would say, without its ~2 s of imports
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: python {name} [config/file.py ...] [--key=value ...]")
    assert "\n  --seed=1337" in done.stdout  # a setting every script has, with its value


@pytest.mark.parametrize("script", ["train.py", "bench.py", "serve.py", "sample.py", "eval.py", "export.py"])
def test_help_answers_before_torch_is_installed(script):
    # a new user may ask --help before pip install: the settings come before the heavy imports
    blocked = "import runpy, sys; sys.modules.update(torch=None, fastapi=None); sys.argv = [sys.argv[1], '--help']; " \
              "runpy.run_path(sys.argv[0], run_name='__main__')"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", blocked, script], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and "--" in done.stdout, done.stderr[-2000:]
