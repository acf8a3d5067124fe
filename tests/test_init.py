"""Init paradigms (issue 17): every registered architecture builds, the `vggface2` preset (offline message, hash checks,
the converter), init from a `.safetensors` file end to end through `mugshotrace run` -> `audit` -> `report`, and the
discriminative learning rates the optimizer really applies to the stages of a pretrained model."""
import os
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch, yaml
from torch import nn
from mugshotrace.core import UserError, read_json, sha256_file
from mugshotrace.train.models import (ARCHS, get_arch, build_model, face_learner, synthetic_dls, check_init, convert_weights,
                                      face_weight_source, face_weights_file, add_weights_parser, INIT_PRESETS, FACE_WEIGHTS)

BIG = {'vgg16_bn', 'vgg19_bn', 'densenet161', 'inception_v4'}   # > 2 s each to build and run on 2 CPU cores: slow

def _tiny(spec): return 32 if spec.name == 'tiny_cnn' else spec.min_size

# ---------------------------------------------------------------- 1. every registered arch builds at random init
def _builds(name):
    spec = get_arch(name); s = _tiny(spec)
    m = build_model(name, 3, 'random', seed=0).eval()
    with torch.no_grad(): assert m(torch.randn(2, 3, s, s)).shape == (2, 3)
    groups = spec.splitter(m)
    ids = [id(p) for g in groups for p in g]
    assert len(groups) >= 3 and all(groups) and len(ids) == len(set(ids)) == len(list(m.parameters()))   # stages + head, each param once
    assert {id(p) for p in groups[-1]} == {id(p) for p in m[1].parameters()}                               # the head is the last group
    cam = spec.cam_layer(m); assert any(cam is x for x in m[0].modules())

@pytest.mark.parametrize('name', sorted(set(ARCHS) - BIG))
def test_arch_builds_at_random_init(name): _builds(name)

@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(BIG))
def test_big_arch_builds_at_random_init(name): _builds(name)

def test_new_archs_registered_like_the_others():
    import timm
    d = get_arch('densenet121'); cfg = timm.models.get_pretrained_cfg('densenet121.tv_in1k')
    assert d.pretrained_tag == 'timm:densenet121.tv_in1k' and (d.mean, d.std, d.input_size) == (tuple(cfg.mean), tuple(cfg.std), cfg.input_size[-1])
    f = get_arch('inception_resnet_v1')
    # facenet's fixed_image_standardization (x - 127.5) / 128 on 0-255 pixels == (x/255 - 0.5) / (128/255)
    x = torch.randint(0, 256, (3, 4, 4)).float()
    from facenet_pytorch import fixed_image_standardization
    ours = (x / 255 - torch.tensor(f.mean)[:, None, None]) / torch.tensor(f.std)[:, None, None]
    assert torch.allclose(ours, fixed_image_standardization(x), atol=1e-6) and f.input_size == 160 and f.pretrained_tag is None
    # the trunk is facenet's network up to its last feature map: same output as the original module's layers
    from facenet_pytorch import InceptionResnetV1
    torch.manual_seed(0); ref = InceptionResnetV1().eval()
    m = build_model('inception_resnet_v1', 2, 'random').eval(); m[0].load_state_dict({k: v for k, v in ref.state_dict().items() if k.split('.')[0] in dict(m[0].named_children())})
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        a = m[0](x); assert a.shape == (2, 1792, 3, 3)
        want = torch.nn.functional.normalize(ref.last_bn(ref.last_linear(ref.avgpool_1a(a).flatten(1))), dim=1)
        assert torch.allclose(ref(x), want, atol=1e-5)   # facenet's forward = our trunk + its embedding head

# ---------------------------------------------------------------- 2. the vggface2 preset
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv('MUGSHOTRACE_WEIGHTS', str(tmp_path/'w')); monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    return tmp_path

def _fake_facenet(path, seed=3):
    from facenet_pytorch import InceptionResnetV1
    torch.manual_seed(seed); sd = InceptionResnetV1(classify=True, num_classes=7).state_dict()
    torch.save(sd, path); return sd

def test_vggface2_offline_error_names_the_path(empty_caches, monkeypatch):
    monkeypatch.setenv('MUGSHOTRACE_OFFLINE', '1')
    with pytest.raises(UserError) as e: build_model('inception_resnet_v1', 2, init='vggface2')
    msg = str(e.value); local = empty_caches/'w'/'inception_resnet_v1.vggface2.safetensors'
    assert '\n' not in msg and f'safetensors at {local}' in msg and '$MUGSHOTRACE_OFFLINE' in msg
    assert 'mugshotrace weights convert 20180402-114759-vggface2.pt' in msg and FACE_WEIGHTS['vggface2']['url'] in msg
    assert face_weight_source('vggface2')['local'] == local
    with pytest.raises(UserError, match="does not fit arch 'resnet18'"): build_model('resnet18', 2, init='vggface2')
    with pytest.raises(UserError, match='inception_resnet_v1 has no ImageNet weights'): build_model('inception_resnet_v1', 2, init='imagenet')

def test_vggface2_cached_download_is_hash_checked(empty_caches, monkeypatch):
    "A file in facenet-pytorch's cache, and a fresh download, are checked against the published sha256 before reading."
    cache = face_weight_source('vggface2')['cache']; cache.parent.mkdir(parents=True)
    _fake_facenet(cache)
    with pytest.raises(UserError, match='does not match the sha256 281cebca'): build_model('inception_resnet_v1', 2, init='vggface2')
    assert not face_weight_source('vggface2')['local'].exists()
    cache.unlink(); seen = {}
    import mugshotrace.train.weights as W
    monkeypatch.setattr(W, 'offline_reason', lambda url, timeout=None: None)
    def fake_download(url, dst, hash_prefix=None, progress=True): seen.update(url=url, hash=hash_prefix); _fake_facenet(dst)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    with pytest.raises(UserError, match='does not match the sha256'): face_weights_file('vggface2')
    assert seen == {'url': FACE_WEIGHTS['vggface2']['url'], 'hash': FACE_WEIGHTS['vggface2']['sha256']}

def test_converter_round_trip(empty_caches, monkeypatch):
    "fake facenet state dict -> .pt -> convert (function and CLI) -> the trunk holds exactly those tensors; the preset finds it."
    import argparse
    monkeypatch.setenv('MUGSHOTRACE_OFFLINE', '1')
    src = empty_caches/'dl'/'20180402-114759-vggface2.pt'; src.parent.mkdir()
    full = _fake_facenet(src)
    assert any(k.startswith(('last_linear', 'logits')) for k in full)       # the embedding head rides along in the file
    h = sha256_file(src)
    sub = argparse.ArgumentParser().add_subparsers(); add_weights_parser(sub)
    a = sub.choices['weights'].parse_args(['convert', str(src), '--sha256', h, '--no-progress'])   # no DST: the preset's place
    assert a.func(a) == 0
    local = face_weight_source('vggface2')['local']; assert local.is_file()
    from safetensors import safe_open
    with safe_open(str(local), 'pt') as f: meta = f.metadata()
    assert meta['source_sha256'] == h and meta['arch'] == 'inception_resnet_v1' and meta['sha256_checked'] == 'True'
    m = build_model('inception_resnet_v1', 2, init='vggface2', seed=0)      # offline: the converted file is used
    body = m[0].state_dict()
    assert set(body) == {k for k in full if not k.startswith(('last_linear', 'last_bn', 'logits'))}
    assert all(torch.equal(body[k], full[k]) for k in body)
    learn = face_learner(synthetic_dls(n=4, size=80, bs=2, arch='inception_resnet_v1'), 'inception_resnet_v1', init='vggface2')
    assert learn.opt.frozen_idx == 4   # pretrained: head only, 4 stages frozen
    # the same file under its release name with no hash given: refused (the published hash does not match the fake)
    with pytest.raises(UserError, match='does not match the sha256'): convert_weights(src, empty_caches/'x.safetensors')
    # a pickle that would run code is refused by weights_only, nothing written
    class Boom:
        def __reduce__(self): return (os.system, ('touch ' + str(empty_caches/'pwned'),))
    torch.save({'w': Boom()}, empty_caches/'evil.pt')
    with pytest.raises(UserError, match='weights_only'): convert_weights(empty_caches/'evil.pt')
    assert not (empty_caches/'pwned').exists() and not (empty_caches/'evil.safetensors').exists()

WEIGHTS_ENTRY = ('fetch pretrained weights as safetensors, or convert a downloaded checkpoint', 'mugshotrace.train.models', 'add_weights_parser')

def test_weights_cli_through_main(tmp_path, monkeypatch, capsys):
    "`mugshotrace weights convert` through the entry point: exit 0 and the file; bad input: one line, exit 2."
    from mugshotrace import cli
    monkeypatch.setitem(cli.SUBCOMMANDS, 'weights', WEIGHTS_ENTRY)   # the entry the lead adds to cli.SUBCOMMANDS
    sd = build_model('tiny_cnn', 2, 'random', seed=8)[0].state_dict(); torch.save(sd, tmp_path/'t.pt')
    assert cli.main(['weights', 'convert', str(tmp_path/'t.pt'), str(tmp_path/'t.safetensors'), '--arch', 'tiny_cnn']) == 0
    body = build_model('tiny_cnn', 2, init=tmp_path/'t.safetensors')[0].state_dict()
    assert all(torch.equal(body[k], sd[k]) for k in sd)
    capsys.readouterr()
    assert cli.main(['weights', 'convert', str(tmp_path/'t.pt'), '--out', str(tmp_path/'u.safetensors'), '--arch', 'resnet18']) == 2
    err = capsys.readouterr().err.strip(); assert err.count('\n') == 0 and 'does not fit resnet18' in err
    monkeypatch.setenv('MUGSHOTRACE_OFFLINE', '1'); monkeypatch.setenv('MUGSHOTRACE_WEIGHTS', str(tmp_path/'w')); monkeypatch.setenv('TORCH_HOME', str(tmp_path/'th'))
    assert cli.main(['weights', 'fetch', 'inception_resnet_v1', '--init', 'vggface2']) == 2
    assert str(tmp_path/'w'/'inception_resnet_v1.vggface2.safetensors') in capsys.readouterr().err
    assert cli.main(['weights', 'fetch', 'inception_resnet_v1', str(tmp_path/'elsewhere'), '--init', 'vggface2']) == 2   # DST: the weights folder
    assert str(tmp_path/'elsewhere'/'inception_resnet_v1.vggface2.safetensors') in capsys.readouterr().err
    assert cli.main(['weights', 'fetch', 'resnet50', '--init', 'vggface2']) == 2 and 'does not fit arch' in capsys.readouterr().err
    # the conventions of every subcommand (tests/test_cli.py): --no-progress, --out where it writes
    flags = {o for a in cli.build_parser(only='weights')._subparsers._group_actions[0].choices['weights']._actions for o in a.option_strings}
    assert {'--no-progress', '--out'} <= flags

def test_check_init():
    assert set(INIT_PRESETS) == {'imagenet', 'random', 'vggface2'}
    for bad, msg in (('imagnet', 'or a path to a .safetensors file'), ('w.pth', '.safetensors'), ('/no/w.safetensors', 'not found')):
        with pytest.raises(UserError, match=msg): check_init(bad, 'resnet50')
    with pytest.raises(UserError, match='does not fit'): check_init('vggface2', 'densenet121')
    assert check_init('vggface2', 'inception_resnet_v1') == 'vggface2'

# ---------------------------------------------------------------- 3. init from a file, end to end
def _init_file(path, seed=1234):
    "A tiny_cnn initialised with a known seed, saved as a bundle-style state dict (trunk '0.…' and head '1.…')."
    from safetensors.torch import save_file
    sd = build_model('tiny_cnn', 2, 'random', seed=seed).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path)); return sd

def test_init_from_safetensors_run_audit_report(tmp_path):
    "`mugshotrace run` with init: FILE on the benchmark, then `audit` and `report`; the model starts from the file."
    from mugshotrace.synth import benchmark as synth
    from mugshotrace.cli import main
    bench = synth.make_benchmark(tmp_path/'bench', synth.SynthConfig(people=48, width=64, height=80, seed=1), progress=False)
    init = tmp_path/'init.safetensors'; sd = _init_file(init)
    cols = {s: {'race': f'race_{s}', 'ethnicity': f'ethnicity_{s}'} for s in ('court', 'student')}
    study = {'name': 'initfile', 'data': {'labels': {'table': str(bench/'labels.csv'), 'columns': cols, 'id': 'image_id', 'path': 'path',
                                                     'person': 'person_id'},
                                          'images': str(bench), 'preprocessed': str(tmp_path/'s'/'faces'), 'truth': str(bench),
                                          'preprocess': {'size': 40, 'progress': False}},
             'train': {'epochs': 1, 'freeze_epochs': 1, 'size': 32, 'bs': 16, 'n_per_class': 16, 'lr': 1e-2, 'lr_mult': 1e6, 'aug': False,
                       'init': str(init), 'test_share': 0.3},
             'grid': {'arch': ['tiny_cnn'], 'variant': ['resized'], 'label_source': ['court']}, 'runs': str(tmp_path/'s'/'runs')}
    (tmp_path/'s').mkdir(); (tmp_path/'s'/'study.yaml').write_text(yaml.safe_dump(study))
    assert main(['run', str(tmp_path/'s'/'study.yaml'), '--no-progress']) == 0
    (run,) = [p.parent for p in (tmp_path/'s'/'runs').glob('*/config.json')]
    cfg = read_json(run/'config.json'); meta = read_json(run/'model.json')
    assert cfg['init'] == str(init) and meta['init'] == str(init) and cfg['name'].endswith('-user')
    # the model started from the file: stage 1 of the trunk (frozen first, then trained at lr/2/lr_mult = 5e-9: Adam moves
    # a weight by about lr per step) still holds the file's convolution; stage 3 (lr 5e-5) and the head moved; the run's
    # own seed would have given other weights
    from safetensors.torch import load_file
    trained = load_file(str(run/'model.safetensors'))
    seeded = build_model('tiny_cnn', 2, 'random', seed=cfg['seed']).state_dict()
    assert not torch.allclose(sd['0.0.0.weight'], seeded['0.0.0.weight'], atol=1e-3)
    assert torch.allclose(trained['0.0.0.weight'], sd['0.0.0.weight'], atol=1e-7, rtol=0)
    assert (trained['0.2.0.weight'] - sd['0.2.0.weight']).abs().max() > 1e-5 and not torch.equal(trained['1.8.weight'], sd['1.8.weight'])
    # the init file's content is part of the run id: other weights under the same path make another run
    from mugshotrace.study.grid import load_study, fingerprint_configs
    st = load_study(tmp_path/'s'/'study.yaml')
    assert fingerprint_configs(st.runs, st.data, prepare=False)[0].run_id == cfg['run_id']
    _init_file(init, seed=99)
    assert fingerprint_configs(st.runs, st.data, prepare=False)[0].run_id != cfg['run_id']
    _init_file(init)
    log = pd.read_csv(run/'log.csv'); assert set(log.phase) == {1, 2}   # the pretrained recipe: phase 1 frozen, phase 2 unfrozen
    assert main(['audit', str(tmp_path/'s'/'runs'), '--out', str(tmp_path/'s'/'audit'), '--n-boot', '50', '--no-progress', '--no-figures']) == 0
    a = pd.read_csv(tmp_path/'s'/'audit'/'audit.csv')
    assert (a.run_id == cfg['run_id']).all() and len(a) and a.value.notna().any()
    assert main(['report', str(tmp_path/'s'), '--no-progress']) == 0
    assert cfg['run_id'] in (tmp_path/'s'/'report.html').read_text()
    assert f'initialisation: {init}' in (run/'model_card.md').read_text()   # the card says where the weights came from

# ---------------------------------------------------------------- 4. discriminative learning rates, really applied
def test_discriminative_lrs_of_a_pretrained_model(tmp_path):
    "The package's recipe on a model initialised from a file: per-stage lrs, increasing to the head, first/last = 1/lr_mult."
    from fastai.callback.core import Callback
    from mugshotrace.study.config import RunConfig
    from mugshotrace.study.runner import train_learner
    init = tmp_path/'init.safetensors'; _init_file(init)
    lr, mult = 1e-2, 100.0
    cfg = RunConfig('tiny_cnn', init=str(init), epochs=1, freeze_epochs=1, lr=lr, lr_mult=mult, precision='fp32')

    class Watch(Callback):
        "lrs per param group at every training batch; the first unfrozen step's largest weight change per stage."
        order = 100
        def before_fit(self): self.rows, self.steps = getattr(self, 'rows', []), getattr(self, 'steps', {})
        def before_step(self):
            self.rows.append((self.opt.frozen_idx, [h['lr'] for h in self.opt.hypers]))
            if self.opt.frozen_idx == 0 and not self.steps: self.before = [g[0].detach().clone() for g in self.learn.splitter(self.model)[:-1]]
        def after_step(self):
            if self.opt.frozen_idx == 0 and not self.steps:
                self.steps = {i: float((g[0].detach() - b).abs().max()) for i, (g, b) in enumerate(zip(self.learn.splitter(self.model)[:-1], self.before))}
                self.step_lrs = self.rows[-1][1]
    w = Watch()
    learn = face_learner(synthetic_dls(n=16, size=32, bs=4, arch='tiny_cnn'), 'tiny_cnn', init=init, seed=0)
    train_learner(learn, cfg, extra_cbs=(w,))
    frozen = [r for fi, r in w.rows if fi == 3]; unfrozen = [r for fi, r in w.rows if fi == 0]
    assert frozen and unfrozen and len(frozen) + len(unfrozen) == len(w.rows)
    for lrs in unfrozen:
        assert len(lrs) == 4 and all(a < b for a, b in zip(lrs, lrs[1:]))                 # distinct, increasing to the head
        assert lrs[0] / lrs[-1] == pytest.approx(1 / mult, rel=1e-9)                      # the known answer
        assert np.allclose(np.diff(np.log(lrs)), np.log(mult) / 3, rtol=1e-9)             # geometric spacing over the stages
    assert max(l[-1] for l in unfrozen) <= lr / 2 * (1 + 1e-9)
    for lrs in frozen: assert lrs[:3] == pytest.approx([lrs[-1] / 10] * 3, rel=1e-9)     # fastai's slice(lr): lr/10 below the head
    # the optimizer applies them: Adam's first step moves a weight by about its group's lr (|m/sqrt(v)| = 1, wd 0.01)
    for i, d in w.steps.items(): assert 0.9 < d / w.step_lrs[i] < 1.1, (i, d, w.step_lrs[i])
    # random init: one lr for all groups (the seed's from-scratch recipe)
    w2 = Watch(); learn = face_learner(synthetic_dls(n=8, size=32, bs=4, arch='tiny_cnn'), 'tiny_cnn', seed=0)
    train_learner(learn, RunConfig('tiny_cnn', init='random', epochs=1, lr=lr, precision='fp32'), extra_cbs=(w2,))
    assert all(len(set(r)) == 1 for _, r in w2.rows)

def test_resnet50_param_groups_are_its_stages_and_head():
    "resnet50 at random init: 5 parameter groups (conv1+layer1, layer2, layer3, layer4, head); slice() spreads 5 lrs."
    learn = face_learner(synthetic_dls(n=2, size=64, bs=2, arch='resnet50'), 'resnet50', init='random', seed=0)
    learn.create_opt(); body = learn.model[0]
    assert len(learn.opt.param_lists) == 5
    want = [list(body.conv1.parameters()) + list(body.bn1.parameters()) + list(body.layer1.parameters()),
            list(body.layer2.parameters()), list(body.layer3.parameters()), list(body.layer4.parameters()), list(learn.model[1].parameters())]
    for got, w in zip(learn.opt.param_lists, want): assert [id(p) for p in got] == [id(p) for p in w]
    learn.opt.set_hypers(lr=slice(1e-5, 1e-3))   # what fit_one_cycle does with slice(lo, hi)
    assert np.allclose([h['lr'] for h in learn.opt.hypers], np.geomspace(1e-5, 1e-3, 5), rtol=1e-9)
