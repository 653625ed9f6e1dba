"""The former name of :mod:`himap.flops`, kept so that existing imports keep working."""

from .flops import (  # noqa: F401
                    FlopsReport,
                    image_tokens_per_layer,
                    layer_flops,
                    layer_matmul_flops,
                    prefill_flops,
                    prefill_flops_for,
                    prefill_matmul_flops_for,
)
