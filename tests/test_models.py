"Architecture registry, learner factory and model bundles (mugshotrace.models)."
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from torch import nn
from mugshotrace.core import UserError
from mugshotrace.models import (ARCHS, get_arch, register_arch, ArchSpec, build_model, face_learner, synthetic_dls,
                                save_bundle, load_bundle, split_by, weight_source, PHASE1_ARCHS, PHASE2_ARCHS)

FAST = ('tiny_cnn', 'alexnet', 'resnet18')
SLOW = tuple(a for a in ARCHS if a not in FAST)

def _size(spec): return 32 if spec.name == 'tiny_cnn' else max(64, spec.min_size)

def _check_arch(name, n_out):
    spec = get_arch(name); size = _size(spec)
    dls = synthetic_dls(n=2, size=size, n_out=n_out, bs=2, arch=name)
    learn = face_learner(dls, name, seed=0)
    groups = learn.splitter(learn.model)
    # per-stage groups that cover every parameter exactly once
    assert len(groups) > 2
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(learn.model.parameters()))
    # the Grad-CAM layer is inside the body and yields a spatial map
    cam = spec.cam_layer(learn.model)
    assert any(cam is m for m in learn.model[0].modules())
    out = {}
    h = cam.register_forward_hook(lambda m, i, o: out.setdefault('a', o))
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)   # one batch of 2
    h.remove()
    assert out['a'].ndim == 4 and out['a'].shape[-1] >= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters())), 'training changed nothing'
    p, y = learn.get_preds(dl=dls.valid)
    assert p.shape == (2, n_out) and torch.allclose(p.sum(1), torch.ones(2), atol=1e-5)

@pytest.mark.parametrize('n_out', [2, 4])
@pytest.mark.parametrize('name', FAST)
def test_arch_builds_trains_predicts(name, n_out): _check_arch(name, n_out)

@pytest.mark.slow
@pytest.mark.parametrize('n_out', [2, 4])
@pytest.mark.parametrize('name', SLOW)
def test_big_arch_builds_trains_predicts(name, n_out): _check_arch(name, n_out)

def test_registry_contents():
    assert set(PHASE1_ARCHS) | set(PHASE2_ARCHS) | {'resnet18', 'tiny_cnn'} == set(ARCHS)
    tags = {a: get_arch(a).pretrained_tag for a in ARCHS}
    assert tags['resnet50'] == 'timm:resnet50.tv_in1k' and tags['inception_v4'] == 'timm:inception_v4.tf_in1k'
    assert tags['legacy_seresnext50_32x4d'] == 'timm:legacy_seresnext50_32x4d.in1k' and tags['alexnet'].startswith('torchvision:')
    assert get_arch('inception_v4').input_size == 299 and get_arch('inception_v4').std == (0.5, 0.5, 0.5)
    # the normalization we record is the one timm ships with the weights
    import timm
    for a in ARCHS:
        s = get_arch(a)
        if s.pretrained_tag and s.pretrained_tag.startswith('timm:'):
            cfg = timm.models.get_pretrained_cfg(s.pretrained_tag[5:])
            assert tuple(cfg.mean) == s.mean and tuple(cfg.std) == s.std and cfg.input_size[-1] == s.input_size, a

def test_register_user_arch():
    spec = ArchSpec('mini_test', lambda pretrained, wf: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)),
                    None, 32, (0.5,)*3, (0.5,)*3, split_by(lambda b: [[b[0]], [b[2]]]), lambda m: m[0][2])
    register_arch(spec)
    try:
        m = build_model('mini_test', 3, seed=0)
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)
        with pytest.raises(ValueError): register_arch(spec)
    finally: ARCHS.pop('mini_test')

def test_imagenet_from_local_file(tmp_path, monkeypatch):
    "init='imagenet' reads `<weights_dir>/<tag>.safetensors` through timm's loader when present."
    import timm
    from safetensors.torch import save_file
    ref = timm.create_model('resnet18', pretrained=False)
    with torch.no_grad(): ref.layer1[0].conv1.weight.fill_(0.25)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path/'resnet18.tv_in1k.safetensors'))
    monkeypatch.setenv('MUGSHOTRACE_WEIGHTS', str(tmp_path))
    assert weight_source(get_arch('resnet18'))['local'] == tmp_path/'resnet18.tv_in1k.safetensors'
    m = build_model('resnet18', 2, init='imagenet')
    assert torch.equal(m[0].layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    assert torch.equal(m[0].layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    # the same file as a user-supplied trunk (init=path)
    m2 = build_model('resnet18', 4, init=tmp_path/'resnet18.tv_in1k.safetensors')
    assert torch.equal(m2[0].layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    # a pickle is never read as user weights
    torch.save(ref.state_dict(), tmp_path/'w.pth')
    with pytest.raises(UserError, match='safetensors'): build_model('resnet18', 2, init=tmp_path/'w.pth')

def test_imagenet_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv('MUGSHOTRACE_WEIGHTS', str(tmp_path))
    with pytest.raises(UserError) as e: build_model('legacy_seresnet50', 2, init='imagenet')
    msg = str(e.value)
    if 'cannot get' not in msg: pytest.skip('weights were downloadable')
    assert 'se_resnet50-ce0d4300.pth' in msg and str(tmp_path) in msg and "init='" in msg

ROUNDTRIP = textwrap.dedent('''
    import sys, torch, json
    from mugshotrace.models import load_bundle
    model, meta = load_bundle(sys.argv[1])
    x = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad(): torch.save(model(x), sys.argv[3])
    print(json.dumps(meta['classes']))
''')

@pytest.mark.parametrize('name', ['tiny_cnn', pytest.param('resnet18', marks=pytest.mark.slow)])
def test_bundle_roundtrip_fresh_process(tmp_path, name):
    n_out = 4
    dls = synthetic_dls(n=4, size=32 if name == 'tiny_cnn' else 64, n_out=n_out, bs=2, arch=name)
    learn = face_learner(dls, name, seed=0)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-2)   # BN running stats must survive too
    info = save_bundle(learn, tmp_path/'bundle', {'variant': 'openface', 'training_data': {'n': 4}, 'run_id': 'abc'})
    assert not list((tmp_path/'bundle').glob('*.pkl'))
    meta = json.loads((tmp_path/'bundle'/'model.json').read_text())
    for k in ('arch', 'classes', 'input_size', 'mean', 'std', 'variant', 'training_data', 'weights_sha256'): assert k in meta
    x = torch.randn(3, 3, 64, 64); torch.save(x, tmp_path/'x.pt')
    learn.model.eval()
    with torch.no_grad(): expected = learn.model(x)
    r = subprocess.run([sys.executable, '-c', ROUNDTRIP, str(tmp_path/'bundle'), str(tmp_path/'x.pt'), str(tmp_path/'y.pt')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ['c0', 'c1', 'c2', 'c3']
    got = torch.load(tmp_path/'y.pt', weights_only=True)
    assert torch.equal(got, expected)

def test_pickle_refused_unless_allowed(tmp_path):
    dls = synthetic_dls(n=4, size=32, n_out=2, bs=2)
    learn = face_learner(dls, 'tiny_cnn', seed=0)
    torch.save(learn, tmp_path/'export.pkl')   # what fastai's export does, minus emptying the data
    with pytest.raises(UserError, match='pickle'): load_bundle(tmp_path/'export.pkl')
    with pytest.raises(UserError, match='pickle'): load_bundle(tmp_path)
    model, meta = load_bundle(tmp_path/'export.pkl', allow_pickle=True)
    x = torch.randn(2, 3, 32, 32); learn.model.eval()
    assert torch.equal(model(x), learn.model(x)) and meta['classes'] == ['c0', 'c1']
