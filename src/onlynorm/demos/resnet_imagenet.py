"""ResNet-18 and ResNet-50 at 3×224×224, reconstructed exactly by ``method="deep", tied=True``.

The targets are :func:`~onlynorm.demos.resnet_models.resnet18` / :func:`~onlynorm.demos.resnet_models.resnet50`
(torchvision's layouts) in float64 with random weights and random BatchNorm statistics (so every folded BatchNorm
is a non-trivial affine map), converted by ``torch.fx``. The untied deep construction is refused by the memory
guard (its estimate is reported); the tied one — every block of a layer sharing one frozen draw, one LU per layer —
is built, solved and verified on a few images of the box ``[0, 1]^{3×224×224}``. Reported: wall and CPU seconds of
conversion, reconstruction and verification, the process's peak resident memory, frozen/tunable/target parameter
counts, and the max relative error ``max |f − g| / max |g|`` over the images.

Used by ``onlynorm demo --resnet --imagenet`` (``--resnet`` alone reports only the conversion and the memory guard's
estimates: :func:`imagenet_estimates`) and ``benchmarks/resnet_imagenet.py`` (one model per child process there, so the
peak memory is that model's alone).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..api import reconstruct
from ..constructions import get_construction
from ..constructions.conv_memory import conv_estimates
from ..constructions.memory import check_memory
from ..domain import Box
from ..errors import MemoryBudgetError
from ..targets.cnn import ConvNetSpec
from ..verify import verify
from .resnet_models import resnet18, resnet50

__all__ = ["MODELS", "imagenet_target", "imagenet_estimates", "imagenet_run", "peak_rss_bytes"]

MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18, "resnet50": resnet50}
IN_SHAPE = (3, 224, 224)


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def imagenet_target(name: str, seed: int = 0) -> nn.Module:
    """The model in float64 eval mode with random weights and random BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return model.double().eval()


def imagenet_estimates(name: str, seed: int = 0) -> tuple[nn.Module, ConvNetSpec, dict[str, Any]]:
    """The target, its conversion and what the memory guard says (nothing is allocated): the seconds of conversion,
    the estimates of every construction, and whether the untied deep network fits (``"fits"`` or ``"refused: …"``)."""
    t0 = time.perf_counter()
    model = imagenet_target(name, seed)
    spec = ConvNetSpec.from_module(model, IN_SHAPE)
    doc: dict[str, Any] = {"model": name, "seed": seed, "threads": torch.get_num_threads()}
    doc["convert_seconds"] = time.perf_counter() - t0
    doc["estimates"] = conv_estimates(spec, torch.float64)
    doc["target_parameters"] = spec.num_parameters
    untied = get_construction("conv_deep")
    try:
        check_memory(untied, spec, dtype=torch.float64, options=untied.check_options({}))
        doc["untied"] = "fits"
    except MemoryBudgetError as exc:
        doc["untied"] = f"refused: {exc}"
    return model, spec, doc


def imagenet_run(
    name: str,
    seed: int = 0,
    images: int = 2,
    progress: Callable[[int, int, str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert, reconstruct (``deep, tied=True``, float64) and verify ``name`` on ``images`` images of the box;
    ``progress`` gets a call per solved layer, ``log`` a line per stage (conversion, reconstruction, verification)."""
    say = log or (lambda line: None)
    t0, c0 = time.perf_counter(), time.process_time()
    say(f"[{name}] converting the model (torch.fx) and asking the memory guard")
    model, spec, doc = imagenet_estimates(name, seed)
    doc["images"] = images
    box = Box(0.0, 1.0)
    say(f"[{name}] reconstructing by deep, tied=True: one LU per layer")
    t1, c1 = time.perf_counter(), time.process_time()
    net = reconstruct(spec, method="deep", tied=True, domain=box, seed=seed, progress=progress)
    doc["reconstruct_seconds"], doc["reconstruct_cpu_seconds"] = time.perf_counter() - t1, time.process_time() - c1
    say(f"[{name}] reconstructed in {doc['reconstruct_seconds']:.0f} s; verifying {images} images of [0, 1]")
    t2, c2 = time.perf_counter(), time.process_time()
    report = verify(net, model, box, samples=images, seed=seed)
    doc["verify_seconds"], doc["verify_cpu_seconds"] = time.perf_counter() - t2, time.process_time() - c2
    doc["total_seconds"], doc["total_cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    s = net.summary()
    solve = net.meta.solve
    doc.update(
        max_rel_error=report.max_rel_error,
        max_abs_error=report.max_abs_error,
        max_target_abs=report.max_target_abs,
        max_relative_residual=solve.max_relative_residual if solve is not None else None,
        frozen_parameters=s.frozen_parameters,
        tunable_parameters=s.tunable_parameters,
        target_parameters=s.target_parameters,
        peak_rss_bytes=peak_rss_bytes(),
    )
    say(f"[{name}] verified in {doc['verify_seconds']:.0f} s: max relative error {report.max_rel_error:.1e}")
    return doc
