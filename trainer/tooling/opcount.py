"""Count the aten ops and host synchronisations of training steps, by where in the model they come from.

On a GPU the SDXL step is launch-bound: every op the dispatcher runs is a kernel launch (or a view, which costs
host time but no kernel), and every ``.item()``/``.tolist()`` drains the device queue. The count is deterministic,
so it measures per-step overhead on any machine, where timings on a shared CPU would not.

A ``TorchDispatchMode`` sees every op after autograd (composite ops decomposed: roughly what a GPU launches),
forward, backward and optimiser. Forward ops take the category of the innermost labelled module or function;
backward ops the category of the forward op that created the autograd node running them (a ``TorchFunctionMode``
writes it into ``grad_fn.metadata``). Tooling only: the runtime never imports this module.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OPTIMIZER = "optimizer (step, zero_grad, schedules)"
LORA = "LoRA layers (adapter ops; a fused layer counts its base GEMM too)"
ATTENTION = "attention (base projections, SDPA, token probe)"
RESNET = "resnets (base convolutions, norms)"
UNET_OTHER = "UNet other (feed-forward, norms, proj in/out, time embedding, up/down)"
TEXT = "text encoders"
ACCUMULATE = "AccumulateGrad (one per trainable tensor)"
OTHER = "loss, noise, data and loop glue"
CATEGORIES = (OPTIMIZER, LORA, ATTENTION, RESNET, UNET_OTHER, TEXT, ACCUMULATE, OTHER)

#: No kernel behind these: aliases of existing storage.
_VIEW_LIKE = {"_unsafe_view"}

_BLOCKS = {"Attention": ATTENTION, "ResnetBlock2D": RESNET, "CLIPTextModel": TEXT,
           "CLIPTextModelWithProjection": TEXT}


class StepOpCounts:
    """Ops per category (all and not views) and host syncs, summed over the counted steps."""

    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.non_view: collections.Counter[str] = collections.Counter()
        self.syncs = 0
        self.steps = 0

    def per_step(self) -> dict[str, Any]:
        steps = max(1, self.steps)
        return {
            "steps": self.steps,
            "all": round(sum(self.ops.values()) / steps),
            "non_view": round(sum(self.non_view.values()) / steps),
            "syncs": round(self.syncs / steps, 1),
            "by_category": {c: [round(self.ops[c] / steps), round(self.non_view[c] / steps)] for c in CATEGORIES},
        }


class _Context:
    """Module and function labels of the code running now (forward side)."""

    def __init__(self) -> None:
        self.modules: list[str | None] = []
        self.labels: list[str] = []
        self.lora_layers: list[torch.nn.Module] = []

    def enter(self, module: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        if self.lora_layers and module is getattr(self.lora_layers[-1], "base_layer", None):
            # A LoRA layer's frozen base counts with the block around it (as it would without the adapter).
            below = self.modules[:len(self.modules) - 1 - self.modules[::-1].index(LORA)]
            self.modules.append(next((m for m in reversed(below) if m is not None), OTHER))
        else:
            self.modules.append(_module_label(module))
        if isinstance(module, LoraLayer):
            self.lora_layers.append(module)

    def leave(self, module: torch.nn.Module) -> None:
        if self.modules:
            self.modules.pop()
        if self.lora_layers and self.lora_layers[-1] is module:
            self.lora_layers.pop()

    def category(self) -> str:
        if self.labels:
            return self.labels[-1]
        for label in reversed(self.modules):
            if label is not None:
                return label
        return OTHER


def _module_label(module: torch.nn.Module) -> str | None:
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        return LORA
    name = type(module).__name__
    if name in _BLOCKS:
        return _BLOCKS[name]
    if name == "UNet2DConditionModel":
        return UNET_OTHER
    return None


class _Tagger(TorchFunctionMode):
    def __init__(self, context: _Context):
        super().__init__()
        self.context = context

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_autograd_node() is not None:
            return out
        category = None
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.grad_fn is not None and "cat" not in value.grad_fn.metadata:
                category = category or self.context.category()
                _tag(value.grad_fn, category)
        return out


def _tag(node, category: str, depth: int = 0) -> None:
    # Nodes created inside composite calls (no torch function of their own) inherit the category of the op above.
    node.metadata["cat"] = category
    if depth > 50:
        return
    for child, _ in node.next_functions:
        if child is not None and "cat" not in child.metadata and type(child).__name__ != "AccumulateGrad":
            _tag(child, category, depth + 1)


class _Counter(TorchDispatchMode):
    def __init__(self, context: _Context, counts: StepOpCounts):
        super().__init__()
        self.context, self.counts = context, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        if node is None:
            category = self.context.category()
        else:
            name = node.name()
            if "AccumulateGrad" in name:
                category = ACCUMULATE
            elif "LoraLinearFunction" in name:  # a custom Function's apply is not seen by the tagger
                category = LORA
            else:
                category = node.metadata.get("cat", OTHER)
        self.counts.ops[category] += 1
        op_name = func.overloadpacket.__name__
        if not (func.is_view or op_name in _VIEW_LIKE):
            self.counts.non_view[category] += 1
        if op_name == "_local_scalar_dense":
            self.counts.syncs += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _patched(owner, attr: str, wrapper_factory) -> Iterator[None]:
    original = getattr(owner, attr)
    setattr(owner, attr, wrapper_factory(original))
    try:
        yield
    finally:
        setattr(owner, attr, original)


@contextlib.contextmanager
def count_ops(counts: StepOpCounts) -> Iterator[None]:
    """Count every op run inside the block into ``counts`` (call ``counts.steps += 1`` per step yourself)."""
    import torch.optim.optimizer as optim_module

    context = _Context()

    def pre_hook(module, args):
        context.enter(module)

    def post_hook(module, args, output):
        context.leave(module)

    def step_pre_hook(optimizer, args, kwargs):
        context.labels.append(OPTIMIZER)

    def step_post_hook(optimizer, args, kwargs):
        context.labels.pop()

    def labelled(label: str):
        def factory(original):
            @functools.wraps(original)
            def wrapper(*args, **kwargs):
                context.labels.append(label)
                try:
                    return original(*args, **kwargs)
                finally:
                    context.labels.pop()
            return wrapper
        return factory

    def tolist_factory(original):
        # A CPU tensor's tolist() reads memory without dispatching an op; on a device it is a synchronisation.
        # The torch-function mode calls the method again from inside the first call: count the outer one.
        depth = [0]

        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            if depth[0] == 0:
                counts.syncs += 1
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
        torch.nn.modules.module.register_module_forward_hook(post_hook, always_call=True),
        optim_module.register_optimizer_step_pre_hook(step_pre_hook),
        optim_module.register_optimizer_step_post_hook(step_post_hook),
    ]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(torch.optim.Optimizer, "zero_grad", labelled(OPTIMIZER)))
        stack.enter_context(_patched(torch.optim.lr_scheduler.LRScheduler, "step", labelled(OPTIMIZER)))
        stack.enter_context(_patched(torch.Tensor, "tolist", tolist_factory))
        try:
            with _Tagger(context), _Counter(context, counts):
                yield
        finally:
            for handle in handles:
                handle.remove()
