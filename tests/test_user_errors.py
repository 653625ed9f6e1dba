"""Every user mistake ends in one line ``himap CMD: error: ...`` and exit 2 (argparse's own errors: the command's
usage and exit 2); internal errors keep their traceback.

The cases are a table: ``Case(name, argv(world) -> list, expected exit code, expected message part)``. A new
command joins by adding rows. ``world`` is a scratch folder with the demo checkpoint, its questions and images,
and helpers that make broken copies of them; nothing here loads a model before the mistake is found, except
the rows that are about the weights themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from himap.cli import main


@dataclass
class World:
    root: Path
    demo: object

    @property
    def model(self) -> str:
        return str(self.demo.model_dir)

    @property
    def questions(self) -> str:
        return str(self.demo.question_file)

    @property
    def images(self) -> str:
        return str(self.demo.image_folder)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def file(self, name: str, text: str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def model_copy(self, name: str, drop: tuple[str, ...] = (), edit: dict | None = None) -> str:
        """A copy of the demo checkpoint without the files ``drop`` (globs), with files replaced by ``edit``."""
        dest = self.root / name
        shutil.copytree(self.demo.model_dir, dest)
        for pattern in drop:
            for p in dest.glob(pattern):
                p.unlink()
        for file, content in (edit or {}).items():
            (dest / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(dest)

    def question_file(self, name: str, edit: Callable[[list], list]) -> str:
        records = json.loads(Path(self.questions).read_text())[:4]
        return self.file(name, json.dumps(edit(records)))

    def run(self, *args: str) -> list[str]:
        """An eval of the demo's first two questions (2 new tokens) into ``out``, plus ``args``."""
        return ["eval", "--model-path", self.model, "--question-file", self.questions, "--image-folder",
                self.images, "--limit", "2", "--max-new-tokens", "2", "--no-progress", *args]

    def official(self, **fields) -> str:
        """A one-problem official ScienceQA source (no image), its fields overridden by ``fields``."""
        problem = {"question": "Which is a bird?", "choices": ["owl", "ant"], "answer": 0, "hint": "",
                   "image": None, "split": "test", **fields}
        self.file("sqa/problems.json", json.dumps({"7": problem}))
        self.file("sqa/pid_splits.json", json.dumps({"test": ["7"]}))
        return self.path("sqa")

    def finished_chunks(self) -> tuple[str, str]:
        """The two chunk folders of a finished 2-chunk eval (made once per session)."""
        base = self.root.parent / "chunks"
        if not (base / "chunk-1-of-2/summary.json").is_file():
            for i in (0, 1):
                assert main(self.run("--output-dir", str(base), "--num-chunks", "2", "--chunk-idx", str(i))) == 0
        return str(base / "chunk-0-of-2"), str(base / "chunk-1-of-2")

    def other_chunk(self) -> str:
        """Chunk 1 of a 2-chunk eval with another policy."""
        base = self.root / "other"
        assert main(self.run("--output-dir", str(base), "--num-chunks", "2", "--chunk-idx", "1", "--use-hmap-v")) == 0
        return str(base / "chunk-1-of-2")

    def unfinished_chunk(self) -> str:
        """A copy of chunk 1 whose run was killed before its summary."""
        dest = self.root / "killed"
        shutil.copytree(self.finished_chunks()[1], dest)
        (dest / "summary.json").unlink()
        return str(dest)


def _truncated(w: World) -> str:
    weights = (Path(w.model) / "model.safetensors").read_bytes()
    return w.model_copy("trunc", edit={"model.safetensors": weights[: len(weights) // 2]})


def _dup(records: list) -> list:
    return [*records, records[0]]


def _answer(records: list, value) -> list:
    records[1]["conversations"][1]["value"] = value
    return records


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[World], list[str]]
    code: int
    message: str
    env: tuple[tuple[str, str], ...] = ()     # environment variables set for this case


DISRUPT = {"kind": "disrupt", "mode": "to_last", "window": None, "n_questions": 1,
           "flows": {"img2txt": {"start": [0], "stop": [2], "label_consistency": [1.0], "score_consistency": [1.0],
                                 "n": [1]}}}
ORIGINAL = json.dumps({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_hidden_size": 1024,
                       "mm_vision_tower": "openai/clip-vit-large-patch14-336", "hidden_size": 64})

CASES = [
    # -- the model ------------------------------------------------------------------------------------------
    Case("model path typo (local)", lambda w: w.run("--model-path", w.path("no-such-model")), 2,
         "model path not found"),
    Case("relative typo under an existing folder is not sent to the hub",
         lambda w: w.run("--model-path", str(Path(w.path("models")).mkdir() or w.path("models/llava-typo"))), 2,
         "model path not found"),
    Case("hub id, hub unreachable", lambda w: w.run("--model-path", "some-owner/some-model"), 2,
         "cannot be reached"),
    Case("hub id, offline mode, not cached", lambda w: w.run("--model-path", "some-owner/some-model"), 2,
         "not in the Hugging Face cache, and HF_HUB_OFFLINE", env=(("HF_HUB_OFFLINE", "1"),)),
    Case("model path is a file", lambda w: w.run("--model-path", w.file("m.bin", "x")), 2, "is a file"),
    Case("folder without config.json", lambda w: w.run("--model-path", w.model_copy("nocfg", drop=("config.json",))),
         2, "no config.json"),
    Case("empty config.json", lambda w: w.run("--model-path", w.model_copy("empty", edit={"config.json": ""})), 2,
         "config.json is empty or corrupt"),
    Case("corrupt config.json", lambda w: w.run("--model-path", w.model_copy("bad", edit={"config.json": "{x"})), 2,
         "config.json is empty or corrupt"),
    Case("config without model_type", lambda w: w.run("--model-path", w.model_copy("nomt", edit={
        "config.json": "{}"})), 2, "names no model_type"),
    Case("unknown model_type", lambda w: w.run("--model-path", w.model_copy("weird", edit={
        "config.json": '{"model_type": "no-such-arch"}'})), 2, "cannot read the config"),
    Case("a text-only model", lambda w: w.run("--model-path", w.model_copy("llama", edit={
        "config.json": '{"model_type": "llama"}'})), 2, "himap supports these VLM families"),
    Case("original-format LLaVA", lambda w: w.run("--model-path", w.model_copy("orig", edit={
        "config.json": ORIGINAL})), 2, "himap convert"),
    Case("no weights", lambda w: w.run("--model-path", w.model_copy("now", drop=("*.safetensors",))), 2,
         "holds no weights"),
    Case("truncated weights", lambda w: w.run("--model-path", _truncated(w)), 2, "damaged or truncated"),
    Case("no processor", lambda w: w.run("--model-path", w.model_copy("nop", drop=("processor_config.json",
                                                                                    "tokenizer*"))), 2,
         "cannot load the processor"),
    Case("--device cuda without CUDA", lambda w: w.run("--device", "cuda"), 2, "CUDA is not available"),
    Case("--device tpu9", lambda w: w.run("--device", "tpu9"), 2, "unknown device 'tpu9'"),
    Case("--device cuda:7 without CUDA", lambda w: w.run("--device", "cuda:7"), 2, "CUDA is not available"),
    Case("--dtype float8", lambda w: w.run("--dtype", "float8"), 2, "invalid choice: 'float8'"),
    Case("--model-base", lambda w: w.run("--model-base", "base"), 2, "--model-base (LoRA checkpoints)"),
    # -- the questions --------------------------------------------------------------------------------------
    Case("question file missing", lambda w: w.run("--question-file", w.path("nope.json")), 2,
         "question file not found"),
    Case("question file is a folder", lambda w: w.run("--question-file", w.root.as_posix()), 2, "(a folder)"),
    Case("question file empty", lambda w: w.run("--question-file", w.file("e.json", "")), 2, "(empty file)"),
    Case("question file truncated", lambda w: w.run("--question-file", w.file("t.json", '[{"id": "a"')), 2,
         "is not valid JSON"),
    Case("question file not a list", lambda w: w.run("--question-file", w.file("o.json", '{"id": 1}')), 2,
         "must hold a JSON list"),
    Case("duplicate ids", lambda w: w.run("--question-file", w.question_file("dup.json", _dup)), 2,
         "repeats the id(s)"),
    Case("--model-path without --question-file",
         lambda w: ["eval", "--model-path", w.model, "--image-folder", w.images], 2,
         "--question-file and --image-folder are required"),
    Case("--num-chunks 0", lambda w: w.run("--num-chunks", "0"), 2, "--num-chunks must be >= 1"),
    Case("--chunk-idx out of range", lambda w: w.run("--num-chunks", "2", "--chunk-idx", "2"), 2,
         "--chunk-idx must be in [0, 2)"),
    Case("--limit 0", lambda w: w.run("--limit", "0"), 2, "--limit must be a positive number"),
    Case("unknown --conv-mode", lambda w: w.run("--conv-mode", "llava_v1"), 2, "unknown conv mode 'llava_v1'"),
    # -- the policy (the same checks as himap flops) --------------------------------------------------------
    Case("--k1 0", lambda w: w.run("--use-hmap-v", "--k1", "0"), 2, "k1 must be >= 1"),
    Case("--r1 beyond the image tokens", lambda w: w.run("--use-hmap-v", "--r1", "1000"), 2,
         "r1=1000 exceeds the "),
    Case("--k2 beyond the layers", lambda w: w.run("--use-hmap-v", "--k2", "99"), 2,
         "k2=99 must be < the number of decoder layers ("),
    Case("--r2 > --r1", lambda w: w.run("--use-hmap-v", "--r1", "4", "--r2", "9"), 2, "r2 must be <= r1"),
    Case("--r1 not a number", lambda w: w.run("--use-hmap-v", "--r1", "half"), 2,
         "--r1 of policy himap must be a count, or a fraction of the image tokens such as 0.5, got 'half'"),
    Case("--r1 fraction above 1", lambda w: w.run("--use-hmap-v", "--r1", "1.5"), 2, "fraction must be in (0, 1]"),
    Case("HiMAP flags with FastV", lambda w: w.run("--policy", "fastv", "--k1", "2"), 2,
         "--policy fastv takes --k, --r; got --k1"),
    Case("PyramidDrop's layers with DART", lambda w: w.run("--policy", "dart", "--layers", "2", "4"), 2,
         "--policy dart takes --k, --r, --pivots-image, --pivots-text; got --layers"),
    Case("policy flags without a policy", lambda w: w.run("--ratio", "0.5"), 2,
         "--policy none takes no policy flags; got --ratio"),
    Case("--layers not layers", lambda w: w.run("--policy", "pdrop", "--layers", "2,four"), 2,
         "--layers of policy pdrop must be one or more values, each an integer"),
    Case("--layers beyond the decoder", lambda w: w.run("--policy", "pdrop", "--layers", "2", "4", "9"), 2,
         "layers=9 must be < the number of decoder layers (8)"),
    Case("--pivots-text 0 and --pivots-image 0", lambda w: w.run("--policy", "dart", "--pivots-image", "0",
                                                                 "--pivots-text", "0"), 2, "at least one pivot"),
    Case("--use-hmap-v contradicts --policy", lambda w: w.run("--use-hmap-v", "--policy", "fastv"), 2,
         "contradicts --policy fastv"),
    Case("unknown policy", lambda w: w.run("--policy", "sparse"), 2, "invalid choice: 'sparse'"),
    Case("--max-new-tokens beyond the context", lambda w: w.run("--max-new-tokens", "5000"), 2,
         "--max-new-tokens 5000 leaves no room for a prompt in the model's context of 1024"),
    Case("disrupt --max-new-tokens beyond the context", lambda w: [
        "disrupt", "--model-path", w.model, "--question-file", w.questions, "--image-folder", w.images,
        "--output-dir", w.path("d"), "--max-new-tokens", "1024"], 2, "leaves no room for a prompt"),
    Case("chat_template on a checkpoint without one", lambda w: w.run(
        "--model-path", w.model_copy("notpl", drop=("chat_template.jinja",)), "--conv-mode", "chat_template"), 2,
        "the checkpoint has no chat template"),
    Case("--batch-size 0", lambda w: w.run("--batch-size", "0"), 2, "--batch-size must be >= 1"),
    Case("--temperature -1", lambda w: w.run("--temperature", "-1"), 2, "--temperature must be >= 0"),
    Case("flops --r1 beyond the image tokens", lambda w: ["flops", "--model", "llava-1.5-7b", "--r1", "1000"], 2,
         "r1=1000 exceeds the 576 image tokens"),
    Case("flops --k2 beyond the layers", lambda w: ["flops", "--model", "llava-1.5-7b", "--k2", "40"], 2,
         "must be < the number of decoder layers (32)"),
    # -- output folders -------------------------------------------------------------------------------------
    Case("output folder is a file", lambda w: w.run("--output-dir", w.file("out-file", "x")), 2,
         "is a file, not a folder"),
    Case("output folder under a file", lambda w: w.run("--output-dir", w.file("f", "x") + "/run"), 2,
         "cannot create output folder"),
    Case("--answers-file is a folder", lambda w: w.run("--answers-file", w.root.as_posix()), 2, "is a folder"),
    Case("image folder missing", lambda w: w.run("--image-folder", w.path("no-images")), 2,
         "image folder not found"),
    Case("image folder is a file", lambda w: w.run("--image-folder", w.file("img", "x")), 2, "(a file)"),
    Case("--limit not a number", lambda w: w.run("--limit", "ten"), 2, "invalid int value: 'ten'"),
    Case("resume with another policy", lambda w: w.run("--output-dir", w.finished_chunks()[0], "--num-chunks",
                                                       "1", "--use-hmap-v"), 2, "other settings (policy: "),
    Case("demo into a file", lambda w: ["demo", "--cache-dir", w.file("cache", "x") + "/demo"], 2,
         "cannot build the demo in"),
    Case("demo cache unwritable", lambda w: ["eval", "--limit", "1"], 2, "cannot build the demo in",
         env=(("HIMAP_CACHE", "/proc/no-cache"),)),
    # -- merge / table / plot -------------------------------------------------------------------------------
    Case("merge with a chunk missing", lambda w: ["merge", w.finished_chunks()[0], "--out", w.path("m")], 2,
         "missing chunk(s) 1"),
    Case("merge --out is an input", lambda w: ["merge", *w.finished_chunks(), "--out", w.finished_chunks()[1]], 2,
         "is one of the folders being merged"),
    Case("merge the same chunk twice", lambda w: ["merge", *w.finished_chunks(), w.finished_chunks()[0], "--out",
                                                  w.path("m")], 2, "chunk(s) 0 given twice"),
    Case("merge a folder that is no run", lambda w: ["merge", w.root.as_posix(), "--out", w.path("m")], 2,
         "is not a himap eval run"),
    Case("merge chunks of different runs", lambda w: ["merge", w.finished_chunks()[0], w.other_chunk(), "--out",
                                                      w.path("m")], 2, "was made with other settings"),
    Case("merge an unfinished chunk", lambda w: ["merge", w.finished_chunks()[0], w.unfinished_chunk(), "--out",
                                                 w.path("m")], 2, "is not finished (no summary.json)"),
    Case("plot into a file", lambda w: ["plot", w.file("d.json", json.dumps(DISRUPT)), "--output-dir",
                                        w.file("png", "x")], 2, "is a file, not a folder"),
    Case("plot a summary with damaged values", lambda w: ["plot", w.file("v.json", json.dumps(
        {**DISRUPT, "flows": {"img2txt": {"start": [0, 1], "label_consistency": [1.0]}}}))], 2, "damaged disrupt"),
    Case("plot a saliency summary with damaged values", lambda w: ["plot", w.file("w.json", json.dumps(
        {"kind": "saliency", "form": "x", "n_questions": 1, "props4all": [[1, 2]], "props4img": "?"}))], 2,
        "damaged saliency"),
    Case("table of nothing finished", lambda w: ["table", w.root.as_posix()], 2, "no finished run"),
    Case("plot a truncated file", lambda w: ["plot", w.file("s.json", '{"kind": "saliency", "form"')], 2,
         "is not valid JSON"),
    Case("plot a missing file", lambda w: ["plot", w.path("none.json")], 2, "result file not found"),
    Case("plot another JSON", lambda w: ["plot", w.file("o.json", '{"a": 1}')], 2, "not a himap saliency"),
    Case("plot an incomplete summary", lambda w: ["plot", w.file("i.json", '{"kind": "disrupt"}')], 2,
         "incomplete disrupt summary"),
    # -- the analyses ---------------------------------------------------------------------------------------
    Case("saliency --model-base", lambda w: ["saliency", "--model-base", "b"], 2, "--model-base"),
    Case("saliency bad chunk", lambda w: ["saliency", "--num-chunks", "2", "--chunk-idx", "5"], 2,
         "--chunk-idx must be in [0, 2)"),
    Case("saliency unknown form", lambda w: ["saliency", "--form", "grad"], 2, "unknown saliency form 'grad'"),
    Case("saliency --device tpu9", lambda w: ["saliency", "--model-path", w.model, "--question-file", w.questions,
                                              "--image-folder", w.images, "--device", "tpu9"], 2,
         "unknown device"),
    Case("saliency duplicate ids", lambda w: ["saliency", "--model-path", w.model, "--question-file",
                                              w.question_file("d.json", _dup), "--image-folder", w.images,
                                              "--output-dir", w.path("s")], 2, "repeats the id(s)"),
    Case("disrupt --isolate-layer with --layers", lambda w: ["disrupt", "--isolate-layer", "1", "--layers", "0"],
         2, "not both"),
    Case("disrupt unknown flow", lambda w: ["disrupt", "--flows", "img2text"], 2, "unknown flow"),
    Case("disrupt --isolate-window 0", lambda w: ["disrupt", "--isolate-window", "0"], 2, "window must be >= 1"),
    Case("disrupt --max-new-tokens 0", lambda w: ["disrupt", "--max-new-tokens", "0"], 2, "max_new_tokens must be"),
    Case("disrupt start layer beyond the model", lambda w: ["disrupt", "--model-path", w.model, "--question-file",
                                                            w.questions, "--image-folder", w.images, "--output-dir",
                                                            w.path("d"), "--isolate-layer", "99"], 2,
         "start layer(s) [99] out of range: the model has "),
    Case("saliency output folder is a file", lambda w: ["saliency", "--model-path", w.model, "--question-file",
                                                        w.questions, "--image-folder", w.images, "--output-dir",
                                                        w.file("f", "x")], 2, "is a file, not a folder"),
    Case("saliency missing question file", lambda w: ["saliency", "--model-path", w.model, "--question-file",
                                                      w.path("q.json"), "--image-folder", w.images], 2,
         "question file not found"),
    Case("disrupt missing model", lambda w: ["disrupt", "--model-path", w.path("nope"), "--question-file",
                                             w.questions, "--image-folder", w.images], 2, "model path not found"),
    Case("unknown flag: the command's usage", lambda w: ["disrupt", "--result-dir", "x"], 2,
         "himap disrupt: error: unrecognized arguments: --result-dir"),
    # -- data -----------------------------------------------------------------------------------------------
    Case("data scienceqa missing source", lambda w: ["data", "scienceqa", "--source", w.path("n"), "--out",
                                                     w.path("o")], 2, "ScienceQA source not found"),
    Case("data scienceqa choices as one text", lambda w: ["data", "scienceqa", "--source", w.official(
        choices="red,blue"), "--out", w.path("o")], 2, "7: choices must be a list of texts, got 'red,blue'"),
    Case("data scienceqa null question", lambda w: ["data", "scienceqa", "--source", w.official(question=None),
                                                    "--out", w.path("o")], 2, "7: question is None"),
    Case("data scienceqa answer out of range", lambda w: ["data", "scienceqa", "--source", w.official(answer=2),
                                                          "--out", w.path("o")], 2, "answer 2 is not an index"),
    Case("data scienceqa --out is a file", lambda w: ["data", "scienceqa", "--source", w.official(), "--out",
                                                      w.file("o", "x")], 2, "is a file, not a folder"),
    Case("data scienceqa corrupt parquet", lambda w: ["data", "scienceqa", "--source", w.file(
        "pq/test-0.parquet", "garbage"), "--pid-splits", w.file("pq/pid_splits.json", '{"test": ["1"]}'), "--out",
        w.path("o")], 2, "is not a readable parquet file"),
    Case("data vc --batch-size 0", lambda w: ["data", "vc", "--batch-size", "0", "--out", w.path("v.json")], 2,
         "--batch-size and --max-new-tokens must be >= 1"),
    Case("convert missing checkpoint", lambda w: ["convert", "--llava-path", w.path("n"), "--vision-path",
                                                  w.path("v"), "--out", w.path("o")], 2, "not found"),
    Case("data vc missing model", lambda w: ["data", "vc", "--model-path", w.path("n"), "--question-file",
                                             w.questions, "--image-folder", w.images, "--out", w.path("vc.json")],
         2, "model path not found"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("user-errors")


@pytest.fixture
def world(scratch, demo, monkeypatch, request):
    root = scratch / request.node.name.split("[")[-1].rstrip("]").replace(" ", "_")[:40].replace("/", "_")
    root.mkdir(exist_ok=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HIMAP_CACHE", str(Path(demo.model_dir).parents[2]))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # a closed port: the hub is unreachable at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # also on a machine with a GPU
    return World(root, demo)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_error(case, world, capsys, monkeypatch):
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    argv = case.argv(world)
    capsys.readouterr()
    usage = False
    try:
        code = main(argv)
    except SystemExit as exit_:                 # argparse's own errors: the command's usage, then the error
        code, usage = exit_.code, True
    err = capsys.readouterr().err.strip().splitlines()
    assert code == case.code, err
    assert err and case.message in err[-1], err
    assert err[-1].startswith(f"himap {argv[0]}"), err
    if usage:
        assert err[0].startswith(f"usage: himap {argv[0]}"), err
    else:                                       # no traceback: one error line (progress bars may precede it)
        assert not any("Traceback" in line for line in err), err
        assert sum(line.startswith(f"himap {argv[0]}: error: ") for line in err) == 1, err


def test_internal_errors_keep_their_traceback(world, monkeypatch):
    import himap.experiments.eval as ev

    for exc in (RuntimeError("a bug"), ValueError("a bug inside torch")):
        def boom(cfg, model=None, processor=None, exc=exc):
            raise exc

        monkeypatch.setattr(ev, "evaluate", boom)
        with pytest.raises(type(exc), match="a bug"):
            main(world.run())


def test_traceback_of_a_user_error_on_request(world, monkeypatch):
    from himap.errors import UserError

    monkeypatch.setenv("HIMAP_TRACEBACK", "1")
    with pytest.raises(UserError, match="unknown device"):
        main(world.run("--device", "tpu9"))


def test_commands_that_load_no_model_import_no_torch(demo, tmp_path):
    """--help, table, plot, merge: nothing imports torch or transformers (they start at once)."""
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps(DISRUPT))
    commands = [["eval", "--help"], ["saliency", "--help"], ["merge", "--help"], ["table", str(tmp_path)],
                ["plot", str(summary)], ["flops", "--help"]]
    code = (f"import sys\nfrom himap.cli import main\nfor argv in {commands}:\n    try:\n        main(argv)\n"
            "    except SystemExit:\n        pass\nheavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_every_flag_of_the_question_file_commands_has_help():
    import argparse

    from himap.cli import build_parser

    def flags(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    yield from flags(p, f"{name} {sub}")
            elif action.dest != "help":
                yield name, action

    mine = ("eval", "merge", "table", "demo", "saliency", "disrupt", "plot", "data", "convert")
    missing = [(name, a.option_strings or a.dest) for name, a in flags(build_parser(), "himap")
               if name.split()[1] in mine and not a.help]
    assert missing == []


def test_a_full_disk_is_one_line():
    from himap.errors import UserError
    from himap.io import JsonlLog

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(UserError, match="cannot write /dev/full: No space left on device"):
        JsonlLog("/dev/full").append({"id": "q", "error": None})


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_output_folder(world, capsys):
    locked = world.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(world.run("--output-dir", str(locked / "run"))) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create output folder" in err[0] and "Permission denied" in err[0]


def test_the_command_table_names_every_command():
    """``himap.cli.COMMANDS`` (which group to import for a command) lists exactly the registered commands."""
    import argparse

    from himap.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)
    for command, group in COMMANDS.items():       # and each command's group alone registers it
        sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
        assert command in sub.choices, group
