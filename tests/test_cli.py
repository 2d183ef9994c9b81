"""m2io_jax.cli: --config files and overrides, and every command's user mistakes as one stderr line, no traceback."""

import os
import subprocess
import sys
import textwrap

import pytest

from m2io_jax import cli
from m2io_jax.data import config as data_config

ENV = dict(os.environ, JAX_PLATFORMS="cpu")

COMMAND = textwrap.dedent('''
    from absl import flags
    from m2io_jax import cli
    from m2io_jax.data import config as data_config

    _NAME = flags.DEFINE_string("name", None, "a required name")
    _CONFIG = cli.define_config(data_config, "settings")

    def main(argv):
        cli.no_positional_arguments(argv)
        cli.require(_NAME)
        if _NAME.value == "wrong":
            raise cli.UserError("name 'wrong' is not accepted")
        if _NAME.value == "missing_file":
            open("/nonexistent/input.txt")
        config = _CONFIG.value
        print(config.retrieval.top_k, config.data_dir, ",".join(config.datasets))

    if __name__ == "__main__":
        cli.run(main)
''')

EXPERIMENT = textwrap.dedent('''
    from m2io_jax.data import config as data_config

    def get_config(data_dir="from_file"):
        c = data_config.get_config()
        c.data_dir = data_dir
        c.retrieval.top_k = 3
        return c
''')


def _run(args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    folder = tmp_path_factory.mktemp("command")
    (folder / "command.py").write_text(COMMAND)
    (folder / "experiment.py").write_text(EXPERIMENT)
    return folder


@pytest.mark.parametrize("args, stdout", [
    (["--name=x"], "10  demo_web,demo_recipe,demo_manual"),
    (["--name=x", "--config.retrieval.top_k=7", "--config.datasets=a", "--config.datasets=b"], "7  a,b"),
    (["--name=x", "--config=experiment.py"], "3 from_file demo_web,demo_recipe,demo_manual"),
    (["--name=x", "--config=experiment.py:/some/dir", "--config.retrieval.top_k=5"], "5 /some/dir demo_web"),
])
def test_config_default_file_and_overrides(command, args, stdout):
    proc = _run(["command.py", *args], cwd=command)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(stdout)


def _assert_one_line_error(proc, program, code, fragment):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{program}: error: ") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, code, fragment", [
    (["--name=x", "--config.retrieval.top_kk=3"],
     2, "--config.retrieval.top_kk: no such config key; closest valid keys: retrieval.top_k"),
    (["--name=x", "--config.retreival.top_k=3"], 2, "closest valid keys: retrieval.top_k"),
    (["--name=x", "--config=experiment.py", "--config.chunk.maxtokens=9"], 2, "closest valid keys: chunk.max_tokens"),
    (["--name=x", "--config=nosuch.py"], 2, "--config=nosuch.py: no such file"),
    (["--name=x", "--config.retrieval.top_k=many"], 2, "--config.retrieval.top_k=many"),
    (["--nmae=x"], 2, "Unknown command line flag 'nmae'"),
    ([], 2, "missing required flags: --name"),
    (["--name=x", "extra"], 2, "unexpected arguments ['extra']"),
    (["--name=wrong"], 1, "name 'wrong' is not accepted"),
    (["--name=missing_file"], 1, "/nonexistent/input.txt"),
])
def test_user_mistakes_are_one_line(command, args, code, fragment):
    _assert_one_line_error(_run(["command.py", *args], cwd=command), "command", code, fragment)


@pytest.mark.parametrize(
    "module, args, code, fragment",
    [
        ("m2io_jax.retrieval.recall", ["--dataset", "nosuch"], 1, "no dataset 'nosuch' in "),
        ("m2io_jax.retrieval.recall", ["--dataset=demo_web", "--config.retrieval.topk=3"], 2, "retrieval.top_k"),
        (
            "m2io_jax.retrieval.recall",
            ["--config.data_dir=/nonexistent"],
            1,
            "config.data_dir=/nonexistent: no such directory",
        ),
        ("m2io_jax.retrieval.recall", ["--dataset=demo_web", "--split=dev"], 2, "--split"),
        (
            "m2io_jax.data.tfds_builder",
            ["--builder_config=nosuch", "--data_dir=/tmp/x"],
            1,
            "--builder_config=nosuch: unknown",
        ),
        ("m2io_jax.data.tfds_builder", ["--builder_config=recipe_qa", "--data_dir=/tmp/x"], 1, "needs --manual_dir"),
        (
            "m2io_jax.data.tfds_builder",
            ["--config=demo_web_qa", "--data_dir=/tmp/x"],
            2,
            "Unknown command line flag 'config'",
        ),
        ("m2io_jax.data.tfds_builder", [], 2, "missing required flags: --builder_config, --data_dir"),
        ("m2io_jax.data.demo.generate", ["somewhere"], 2, "unexpected arguments ['somewhere']"),
        ("m2io_jax.evaluate", ["--predictions=p.jsonl"], 2, "missing required flags: --data"),
        (
            "m2io_jax.evaluate",
            ["--predictions=/nonexistent/p.jsonl", "--data=/tmp", "--config.bertscore.enabled=false"],
            1,
            "/nonexistent/p.jsonl",
        ),
    ],
)
def test_commands_report_user_mistakes_in_one_line(module, args, code, fragment):
    _assert_one_line_error(_run(["-m", module, *args]), module.rsplit(".", 1)[1], code, fragment)


def test_unknown_override_message_names_closest_keys():
    config = data_config.get_config()
    assert cli.unknown_override_message(config, "split.salt") is None
    assert cli.unknown_override_message(config, "split.sallt") == (
        "--config.split.sallt: no such config key; closest valid keys: split.salt, split.validation, split.test")
    assert "valid keys: candidates, candidates.max_images" in cli.unknown_override_message(config, "zzz")


def test_experiment_configs_build_on_the_package_default():
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    default = data_config.get_config()
    assert cli.load_config(os.path.join(configs, "demo.py")).to_dict() == default.to_dict()
    mramg = cli.load_config(os.path.join(configs, "mramg.py") + ":/data/MRAMG")
    assert mramg.data_dir == "/data/MRAMG" and mramg.datasets == ("wit", "wiki", "web", "arxiv", "recipe", "manual")
    assert mramg.retrieval.to_dict() == default.retrieval.to_dict() and mramg.split.to_dict() == default.split.to_dict()
