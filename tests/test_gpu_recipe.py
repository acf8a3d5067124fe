"""The GPU recipe on a real GPU (issue 19; `--runcuda`, run by `bench/gpu_session.sh`): what `train_learner` trains
with under `precision: auto`, `compile: on` and the memory estimate against the allocator."""
import sys
from pathlib import Path
import pytest, torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))


def _learner(arch, size, n=256, bs=64):
    import gpu_parts as P
    from mugshotrace.train.models import face_learner, get_arch
    spec = get_arch(arch)
    dls = P.device_dls(n, size, spec.mean, spec.std, bs, torch.device('cuda'))
    learn = face_learner(dls, spec, init='random', seed=0); learn.model.cuda(); return learn


@pytest.mark.cuda
@pytest.mark.parametrize('arch,compile_,want', [('legacy_seresnet50', 'auto', 'fp32'), ('resnet50', 'auto', 'bf16+cl'),
                                               ('tiny_cnn', 'on', 'bf16+cl+compile')])
def test_train_learner_recipe_on_gpu(arch, compile_, want):
    "The measured recipe is what trains, with exactly one autocast (no fp16 under the bf16), and is undone afterwards."
    from fastai.callback.fp16 import MixedPrecision
    from mugshotrace.study.config import RunConfig
    from mugshotrace.study.runner import train_learner
    learn = _learner(arch, 64)
    seen, dtypes = [], []
    from fastai.callback.core import Callback
    class Spy(Callback):
        order = 99
        def after_pred(self): seen.append([c.amp_mode.value for c in self.learn.cbs if isinstance(c, MixedPrecision)])
    # the model's own output type, inside autocast (MixedPrecision casts `pred` back to float before other callbacks see it)
    hook = learn.model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    used = train_learner(learn, RunConfig(arch=arch, init='random', epochs=1, compile=compile_, size=64), extra_cbs=(Spy(),))
    hook.remove()
    assert used['recipe'] == want and used['device'] == 'cuda'
    half = want.startswith('bf16')
    assert seen and all(m == (['bf16'] if half else []) for m in seen)
    assert dtypes and all(d == (torch.bfloat16 if half else torch.float32) for d in dtypes)
    assert not any(isinstance(c, MixedPrecision) for c in learn.cbs) and learn.model._compiled_call_impl is None


@pytest.mark.cuda
@pytest.mark.parametrize('arch,bs,prec', [('resnet18', 64, 'bf16'), ('resnet50', 64, 'fp32'), ('resnet50', 128, 'bf16')])
def test_memory_estimate_covers_gpu_peak(arch, bs, prec):
    "`train.memory.estimate_memory` against fastai training steps on the GPU: it covers the allocator's peak (printed for calibration)."
    from mugshotrace.train.memory import estimate_memory, GiB
    from mugshotrace.train.recipe import recipe_applied, resolve_precision
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    learn = _learner(arch, 224, n=bs * 3, bs=bs)
    with recipe_applied(learn, resolve_precision(prec, arch, gpu=True)), learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    alloc, res = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    e = estimate_memory(arch, 224, bs, prec); counted = e.params + e.activations + e.transient
    print(f'{arch} bs {bs} {prec}: counted {counted / GiB:.2f} GiB, allocated {alloc / GiB:.2f} ({counted / alloc:.2f}x), '
          f'reserved {res / GiB:.2f}, estimate {e.gib:.2f} GiB ({e.total / res:.2f}x reserved)')
    assert e.total >= res
