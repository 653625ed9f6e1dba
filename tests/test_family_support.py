"""The support matrix: README's table, the engine's family registry and the test bed list the same families."""

import re
from pathlib import Path

import pytest
import torch
import transformers as tf

import families
import himap
from himap.errors import UserError
from himap.models import family_of, supported_families

README = Path(__file__).parents[1] / "README.md"


def readme_families() -> list[str]:
    """First-column cells of the markdown table under the heading "Supported models" in README.md."""
    lines = README.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(r"#+\s*Supported models\s*", line)), None)
    assert start is not None, "README.md has no 'Supported models' heading"
    rows, table = [], False
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            table = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
    assert len(rows) > 2 and set(rows[1][0]) <= set("-: "), "no markdown table under 'Supported models'"
    return [row[0] for row in rows[2:]]


def test_readme_matrix_lists_exactly_the_supported_families():
    names = [f.name for f in supported_families()]
    listed = readme_families()
    assert sorted(listed) == sorted(names) and len(listed) == len(set(listed))


def test_every_supported_family_has_a_test_bed():
    registered = {t for f in supported_families() for t in f.model_types}
    built = {name.split("+")[0] for name in families.FAMILIES}      # "+decoder": another decoder, same family
    assert registered == built, "each family needs a builder in tests/families.py"
    for name in families.FAMILIES:
        assert name.split("+")[0] in family_of(families.model(name)).model_types
        assert Path(__file__).with_name(f"test_family_{name.replace('+', '_')}.py").exists()


def test_unsupported_model_is_one_line_naming_the_families():
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    with pytest.raises(UserError) as error:
        himap.apply(model, himap.FastV(k=1, r=4))
    message = str(error.value)
    assert "\n" not in message
    assert all(f.name in message for f in supported_families())
