"""The package's public face: what ``import lora_phi3`` loads, exports and still accepts."""

import json
import subprocess
import sys

import pytest

import lora_phi3


def _fresh_import(code: str) -> dict:
    """Run ``code`` after ``import lora_phi3`` in a fresh interpreter; it prints a JSON value."""
    out = subprocess.run([sys.executable, "-c", "import lora_phi3, json, sys\n" + code],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_import_loads_neither_transformers_nor_the_job():
    loaded = _fresh_import("print(json.dumps(sorted(sys.modules)))")
    assert [m for m in loaded if m == "transformers" or m.startswith("transformers.")] == []
    assert [m for m in loaded if m.startswith("lora_phi3.finetune")] == []


def test_the_library_never_imports_the_job_or_transformers():
    # Every library module imported in a fresh interpreter, then: still neither is loaded.
    code = ("import importlib, pathlib\n"
            "root = pathlib.Path(lora_phi3.__file__).parent\n"
            "for f in sorted(root.rglob('*.py')):\n"
            "    parts = f.relative_to(root).with_suffix('').parts\n"
            "    if parts[0] in ('finetune', '__main__', 'cli'):\n"
            "        continue\n"
            "    name = '.'.join(('lora_phi3',) + parts).removesuffix('.__init__')\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lora_phi3.finetune')\n"
            "                        or m == 'transformers')))")
    assert _fresh_import(code) == []


def test_all_names_exist_and_are_library_objects():
    for name in lora_phi3.__all__:
        obj = getattr(lora_phi3, name)
        assert not getattr(obj, "__module__", "lora_phi3").startswith("lora_phi3.finetune"), name


@pytest.mark.parametrize("name", ["Recipe", "TrainingConfig", "load_recipe"])
def test_job_names_moved_but_still_work_with_a_deprecation_warning(name):
    import lora_phi3.finetune as job

    with pytest.warns(DeprecationWarning, match=rf"lora_phi3.{name} moved to lora_phi3.finetune.{name}"):
        obj = getattr(lora_phi3, name)
    assert obj is getattr(job, name)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Recipes'"):
        lora_phi3.Recipes  # noqa: B018


def test_old_module_entry_point_still_runs_the_command_with_a_warning():
    out = subprocess.run([sys.executable, "-W", "default", "-m", "lora_phi3.cli", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "finetune" in out.stdout
    assert "`python -m lora_phi3.cli` is deprecated; use `python -m lora_phi3`" in out.stderr
