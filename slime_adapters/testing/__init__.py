"""Float64 loop oracles, one module per component, for tests, benchmarks and ports.

Each oracle is the slow, obvious version of a fast component: loops over samples, tiles, heads
and tokens with every formula written out, reading a module's parameters and config but never its
methods. Compare a fast path against its oracle in float64 (``torch.float64`` inputs and
modules); the library's own tests do so with the tolerances they state.

=====================  ===========================================================
module                 oracles
=====================  ===========================================================
``testing.attention``  :func:`attention_reference`
``testing.compressor`` :func:`query_compressor_reference`, :func:`layer_norm_reference`,
                       :func:`sincos_2d_reference`, :func:`gelu_reference`
``testing.projector``  :func:`noisy_moe_reference`, :func:`mlp_reference`
``testing.router``     :func:`router_reference`, :func:`router_reference_released`
``testing.selectors``  :func:`random_selector_reference`, :func:`spatial_selector_reference`,
                       :func:`norm_selector_reference`, :func:`diversity_selector_reference`,
                       :func:`question_topk_reference`, :func:`saliency_selector_reference`,
                       :func:`contextual_tokens_reference`, :func:`budget_count_reference`
``testing.slicing``    :func:`slice_image_reference`
``testing.splice``     :func:`splice_reference`
``testing.adapter``    :func:`adapter_reference`
=====================  ===========================================================

``mode="reference"`` elsewhere in the library means "the released SliME code's behaviour"; the
oracles here are named ``*_reference`` because they are the reference implementations of the
formulas, in whichever mode the module under test runs.
"""

from slime_adapters.testing.adapter import adapter_reference
from slime_adapters.testing.attention import attention_reference
from slime_adapters.testing.compressor import (
    gelu_reference,
    layer_norm_reference,
    module_tensors,
    query_compressor_reference,
    sincos_2d_reference,
)
from slime_adapters.testing.projector import mlp_reference, noisy_moe_reference
from slime_adapters.testing.router import router_reference, router_reference_released
from slime_adapters.testing.selectors import (
    budget_count_reference,
    contextual_tokens_reference,
    diversity_selector_reference,
    norm_selector_reference,
    question_topk_reference,
    random_selector_reference,
    saliency_selector_reference,
    spatial_selector_reference,
)
from slime_adapters.testing.slicing import slice_image_reference
from slime_adapters.testing.splice import splice_reference

__all__ = [
    "adapter_reference",
    "attention_reference",
    "budget_count_reference",
    "contextual_tokens_reference",
    "diversity_selector_reference",
    "gelu_reference",
    "layer_norm_reference",
    "mlp_reference",
    "module_tensors",
    "noisy_moe_reference",
    "norm_selector_reference",
    "question_topk_reference",
    "random_selector_reference",
    "query_compressor_reference",
    "router_reference",
    "router_reference_released",
    "saliency_selector_reference",
    "slice_image_reference",
    "sincos_2d_reference",
    "spatial_selector_reference",
    "splice_reference",
]
