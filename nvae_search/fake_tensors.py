"""What the memory predictor reads of torch's fake-tensor internals (private, moved between releases): where torch
renamed what it reads, both spellings are accepted (``abstract_impl`` in 2.4), and where a reader raises the
predictor takes the fake mode's own way (its general dispatch, its constructor): slower, the same figures.
Checked on torch 2.4.1, 2.7.1, 2.13.0, 2.14.1 and 2.15.0 (the same predictions, byte for byte)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["fake_constructor", "fake_mode_runs_meta_kernel"]


def fake_mode_runs_meta_kernel(fake_mode: Any, func: Any) -> bool:
    """Whether the fake mode itself would answer ``func`` with its meta kernel (the order of its dispatch), rather
    than a decomposition or one of its own device-aware implementations (convolutions' layouts, constructors, ...),
    whose outputs may differ from the bare meta kernel's (e.g. batch norm's saved statistics in half precision)."""
    from torch._decomp import decomposition_table, meta_table
    from torch._subclasses import fake_impls
    from torch._subclasses.fake_tensor import torch_decomp_decompositions

    if func not in meta_table and not fake_mode.cpp_meta_supports_symint(func):
        if func in decomposition_table and torch_decomp_decompositions(func):
            return False
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            return False
    if "prims::" in func._schema.name or _registered_fake_kernel(func) is not None:
        return False
    if any(check(func) for check, _ in fake_impls.op_implementations_checks):
        return False
    return bool(fake_impls.has_meta(func))


def _registered_fake_kernel(func: Any) -> Any:
    """The fake kernel a library registered for ``func`` (``torch.library.register_fake``), or None."""
    entry = torch._library.simple_registry.singleton.find(func.name())
    holder = getattr(entry, "fake_impl", None) or entry.abstract_impl  # named abstract_impl up to torch 2.4
    return holder.kernel


def fake_constructor(fake_mode: Any) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``FakeTensor(fake_mode, meta, device)`` at a third of its cost (a step makes some 70,000): the subclass made as
    the constructor makes it, then given the attributes the constructor gives every new fake tensor, copied from one
    it made. Where this torch's constructor does something the copy does not (checked on a probe), the constructor."""
    from torch._subclasses.fake_tensor import FakeTensor

    def constructor(meta: torch.Tensor, device: Any) -> torch.Tensor:
        return FakeTensor(fake_mode, meta, device)

    def copy(meta: torch.Tensor, device: Any) -> torch.Tensor:
        t = torch.Tensor._make_subclass(
            FakeTensor, meta, meta.requires_grad, dispatch_device=True, device_for_backend_keys=device
        )
        protect(t)
        t.__dict__.update(template)
        t.fake_device = device
        return t

    try:
        cpu = torch.device("cpu")
        probe = constructor(torch.empty(2, 3, device="meta"), cpu)
        template = {k: v for k, v in vars(probe).items() if k not in ("fake_device", "_fake_device")}
        protect = (
            torch._C._set_warn_deprecated_on_mutable_data_ptr
            if fake_mode._allow_unsafe_data_ptr_access
            else torch._C._set_throw_on_mutable_data_ptr
        )
        made = copy(torch.empty(2, 3, device="meta"), cpu)
        same = vars(made) == vars(probe) and torch._C._dispatch_keys(made) == torch._C._dispatch_keys(probe)
    except Exception:  # torch internals moved
        return constructor
    return copy if same else constructor
