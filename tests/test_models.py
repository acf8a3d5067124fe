"Architecture registry, pretrained weights, learner factory and model bundles (mugshotrace.train.weights/archs/bundle/models)."
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from torch import nn
from mugshotrace.core import UserError
from mugshotrace.train.models import (ARCHS, get_arch, register_arch, ArchSpec, build_model, face_learner, synthetic_dls,
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
    assert set(PHASE1_ARCHS) | set(PHASE2_ARCHS) | {'resnet18', 'tiny_cnn', 'densenet121', 'inception_resnet_v1'} == set(ARCHS)
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

OFFLINE_VARS = ('MUGSHOTRACE_OFFLINE', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')

@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    "No local weights, empty torch hub and Hugging Face caches, no offline switch set."
    monkeypatch.setenv('MUGSHOTRACE_WEIGHTS', str(tmp_path/'weights'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path/'hf'))
    for v in OFFLINE_VARS: monkeypatch.delenv(v, raising=False)
    return tmp_path

@pytest.mark.parametrize('arch,remote', [('legacy_seresnet50', 'se_resnet50-ce0d4300.pth'), ('alexnet', 'alexnet-owt-7be5be79.pth'),
                                         ('resnet50', 'timm/resnet50.tv_in1k')])
def test_imagenet_offline_fails_fast(empty_caches, monkeypatch, arch, remote):
    "A host that never answers: one short probe (timeout <= 1 s) decides, and no download or retry is attempted."
    import socket
    calls = []
    def timed_out(*a, **k): calls.append(k.get('timeout', a[1] if len(a) > 1 else None)); raise OSError('timed out')
    monkeypatch.setattr(socket, 'create_connection', timed_out)
    with pytest.raises(UserError) as e: build_model(arch, 2, init='imagenet')
    assert len(calls) == 1 and calls[0] is not None and calls[0] <= 1, f'offline not detected by one short probe: {calls}'
    msg = str(e.value)
    assert 'offline' in msg and remote in msg and str(empty_caches/'weights') in msg and '.safetensors' in msg
    assert "init='" in msg and 'fetch_weights' in msg and '\n' not in msg

@pytest.mark.parametrize('var', OFFLINE_VARS)
def test_imagenet_offline_switch(empty_caches, monkeypatch, var):
    import socket
    calls = []
    monkeypatch.setattr(socket, 'create_connection', lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError('no network')))
    monkeypatch.setenv(var, '1')
    with pytest.raises(UserError, match=f'offline \\(\\${var} is set\\)'): build_model('resnet18', 2, init='imagenet')
    assert calls == [], 'the offline switch must decide without touching the network'

EVIL = textwrap.dedent('''
    import os, pickle, sys
    class Evil:
        def __reduce__(self): return (os.system, (f'touch {sys.argv[2]}',))
    with open(sys.argv[1], 'wb') as f: pickle.dump({'features.0.weight': Evil()}, f)
''')

def test_planted_pickle_in_hub_cache_never_runs(empty_caches, monkeypatch):
    "A pickle planted where torch hub caches AlexNet's weights would run code on load: it is refused unread, in one line."
    cache = empty_caches/'torch'/'hub'/'checkpoints'/'alexnet-owt-7be5be79.pth'; cache.parent.mkdir(parents=True)
    marker = empty_caches/'pwned'
    subprocess.run([sys.executable, '-c', EVIL, str(cache), str(marker)], check=True)
    with pytest.raises(UserError) as e: build_model('alexnet', 2, init='imagenet')
    assert not marker.exists(), 'the planted pickle ran'
    assert 'sha256' in str(e.value) and 'not loaded' in str(e.value) and '\n' not in str(e.value)
    # even a file that passed the hash check is read without pickle's code execution
    from mugshotrace.train.models import _read_weights
    with pytest.raises(Exception): _read_weights(cache)
    assert not marker.exists()

def test_cached_download_with_good_hash_is_used(empty_caches, monkeypatch):
    "A torch hub cache file whose sha256 matches the prefix in its name is loaded (weights_only) without the network."
    import hashlib, torchvision
    from mugshotrace.train import weights as M   # pretrained_file looks the source up here
    ref = torchvision.models.alexnet(weights=None)
    with torch.no_grad(): ref.features[0].weight.fill_(0.5)
    d = empty_caches/'torch'/'hub'/'checkpoints'; d.mkdir(parents=True)
    torch.save(ref.state_dict(), d/'tmp.pth')
    prefix = hashlib.sha256((d/'tmp.pth').read_bytes()).hexdigest()[:8]
    url = f'https://download.pytorch.org/models/alexnet-owt-{prefix}.pth'
    (d/'tmp.pth').rename(d/url.rsplit('/', 1)[1])
    real = M.weight_source
    monkeypatch.setattr(M, 'weight_source', lambda spec: {**real(spec), 'remote': url, 'cache': d/url.rsplit('/', 1)[1]})
    monkeypatch.setenv('MUGSHOTRACE_OFFLINE', '1')
    m = build_model('alexnet', 2, init='imagenet')
    assert torch.equal(m[0][0].weight, ref.features[0].weight)

# hostile bundles: each is refused with a one-line UserError, never a traceback or a load
def _good_bundle(root):
    dls = synthetic_dls(n=2, size=32, n_out=2, bs=2)
    info = save_bundle(face_learner(dls, 'tiny_cnn', seed=0), root/'b')
    return root/'b', info

def _json(b, obj): (b/'model.json').write_text(obj if isinstance(obj, str) else json.dumps(obj))

HOSTILE = {
    'not json': ('{"arch": "tiny_cnn", ', 'not valid JSON'),
    'a list': ('[1, 2]', 'not a valid model bundle'),
    'missing arch': (lambda i: {k: v for k, v in i.items() if k != 'arch'}, "'arch' is a required property"),
    'missing sha': (lambda i: {k: v for k, v in i.items() if k != 'weights_sha256'}, 'weights_sha256'),
    'classes a string': (lambda i: {**i, 'classes': 'c0c1'}, 'classes'),
    'input_size a string': (lambda i: {**i, 'input_size': 'big'}, 'input_size'),
    'mean of 2': (lambda i: {**i, 'mean': [0.5, 0.5]}, 'mean'),
    'zero std': (lambda i: {**i, 'std': [0, 1, 1]}, 'std'),
    'sha not hex': (lambda i: {**i, 'weights_sha256': 'x' * 64}, 'weights_sha256'),
    'unknown arch': (lambda i: {**i, 'arch': 'lenet'}, 'unknown architecture'),
    'parent path': (lambda i: {**i, 'weights_file': '../other/model.safetensors'}, 'inside the bundle folder'),
    'absolute path': (lambda i: {**i, 'weights_file': 'ABS'}, 'inside the bundle folder'),
    'n_out vs classes': (lambda i: {**i, 'n_out': 3}, 'n_out is 3'),
    'more classes than the head': (lambda i: {**i, 'classes': ['a', 'b', 'c'], 'n_out': 3}, 'the head has 2 outputs'),
    'other arch': (lambda i: {**i, 'arch': 'resnet18'}, 'does not fit the architecture'),
    'future format': (lambda i: {**i, 'format_version': 99}, 'format_version'),
}

@pytest.mark.parametrize('case', list(HOSTILE))
def test_hostile_bundle_one_line_error(tmp_path, case):
    b, info = _good_bundle(tmp_path)
    other, _ = _good_bundle(tmp_path/'x'); (tmp_path/'other').mkdir(); (tmp_path/'other'/'model.safetensors').write_bytes((other/'model.safetensors').read_bytes())
    obj, expect = HOSTILE[case]
    obj = obj(info) if callable(obj) else obj
    if isinstance(obj, dict) and obj.get('weights_file') == 'ABS': obj['weights_file'] = str(tmp_path/'other'/'model.safetensors')
    _json(b, obj)
    with pytest.raises(UserError) as e: load_bundle(b)
    assert expect in str(e.value) and '\n' not in str(e.value), str(e.value)

def test_bundle_weights_symlink_out_refused(tmp_path):
    b, info = _good_bundle(tmp_path)
    (tmp_path/'outside.safetensors').write_bytes((b/'model.safetensors').read_bytes())
    (b/'link.safetensors').symlink_to(tmp_path/'outside.safetensors')
    _json(b, {**info, 'weights_file': 'link.safetensors'})
    with pytest.raises(UserError, match='outside the bundle folder'): load_bundle(b)
    _json(b, info); assert load_bundle(b)[1]['classes'] == ['c0', 'c1']

def test_bundle_truncated_weights_one_line(tmp_path):
    "A weights file that is not safetensors at all, with a matching hash in model.json: a one-line error."
    from mugshotrace.core import sha256_file
    b, info = _good_bundle(tmp_path)
    (b/'model.safetensors').write_bytes(b'garbage')
    _json(b, {**info, 'weights_sha256': sha256_file(b/'model.safetensors')})
    with pytest.raises(UserError, match='not a readable safetensors file'): load_bundle(b)

def test_cli_label_hostile_bundle_exit_2(tmp_path, capsys):
    from mugshotrace.cli import main
    b, info = _good_bundle(tmp_path); _json(b, {**info, 'weights_file': '../../etc/passwd'})
    (tmp_path/'imgs').mkdir()
    assert main(['label', str(b), '--images', str(tmp_path/'imgs'), '--out', str(tmp_path/'o.csv')]) == 2
    err = capsys.readouterr().err
    assert 'inside the bundle folder' in err and 'Traceback' not in err

ROUNDTRIP = textwrap.dedent('''
    import sys, torch, json
    from mugshotrace.train.models import load_bundle
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


def test_model_bundle_roundtrip(tmp_path):
    "`ModelBundle`: one description read and written in one place; the function forms agree with it."
    from mugshotrace.train.bundle import ModelBundle
    from mugshotrace.train.models import read_bundle_meta
    learn = face_learner(synthetic_dls(n=2, size=32, n_out=2, bs=2), 'tiny_cnn', seed=0)
    b = ModelBundle(arch='tiny_cnn', classes=['Black', 'White'], variant='openface', task='race2', run_id='r1').save(learn.model, tmp_path/'b')
    assert (b.mean, b.std, b.input_size) == (get_arch('tiny_cnn').mean, get_arch('tiny_cnn').std, 64)   # the arch's: one set of defaults
    assert ModelBundle.load(tmp_path/'b') == b and b.to_meta() == read_bundle_meta(tmp_path/'b')
    model, meta = load_bundle(tmp_path/'b')
    assert meta == b.to_meta() and meta['task'] == 'race2' and meta['run_id'] == 'r1'
    x = torch.randn(2, 3, 32, 32); learn.model.eval()
    assert torch.allclose(model(x), learn.model(x)) and torch.allclose(b.model()(x), model(x))
    assert ModelBundle(arch='inception_v4', classes=['a']).mean == (0.5, 0.5, 0.5)
    with pytest.raises(UserError, match='unknown architecture'): ModelBundle(arch='lenet', classes=['a'])
