"""--amp: bfloat16 autocast in condensation and evaluation, while images, gradients, optimiser states and
losses stay float32."""
import argparse

import pytest
import torch

import distill
import main
import main_DM
import utils
from helpers import separable, tiny
from runs import SynSet
from utils import DataInfo, autocast, tensor_loader


def namespace(**kw):
    a = dict(model='ConvNetW32', device='cpu', ipc=2, batch_real=8, batch_train=256, lr_img=0.1, lr_net=0.01,
             init='noise', dis_metric='ours', dsa=True, dsa_strategy='crop_flip', amp=True, compile=False, query=4,
             window=2, max_outer=2, max_inner=2, lambda_1=0.04, lambda_2=0.03, inner_weight=0.01, Iteration=16,
             layer_weights=[0.1, 0.1, 1.0, 1.0])
    a.update(kw)
    return argparse.Namespace(**a)


def info(num_classes=3, channel=1, size=12):
    return DataInfo('X', channel, (size, size), num_classes, tuple(map(str, range(num_classes))), (0.0,) * channel,
                    (1.0,) * channel, 'x')


@pytest.mark.parametrize('cls', [main_DM.DM, main.GradientMatching, distill.CAFE], ids=['DM', 'DSA', 'CAFE'])
def test_an_iteration_under_amp_keeps_images_gradients_optimiser_and_loss_in_float32(cls, monkeypatch):
    real, args, data = tiny(per_class=12), namespace(), info()
    method = cls(args, data)
    if cls is main.GradientMatching:
        method.outer_loop, method.inner_loop = 2, 2  # (a short iteration: ipc 2's loops are 2 and 6)
    syn = SynSet(real, args, data)
    before = syn.images.detach().clone()
    seen = []
    step = SynSet.step

    def record(self, loss):
        seen.append((loss.dtype, torch.is_autocast_enabled('cpu')))
        step(self, loss)
        seen.append(self.images.grad.dtype)

    monkeypatch.setattr(SynSet, 'step', record)
    with autocast(args):
        out = method.iteration(0, syn, real)
    loss = out['loss'] if isinstance(out, dict) else out
    assert isinstance(loss, float) and torch.isfinite(torch.tensor(loss))
    assert seen[0] == (torch.float32, True) and seen[1] == torch.float32  # the loss, the images' gradient
    assert syn.images.dtype == torch.float32 and not torch.equal(syn.images, before)
    assert syn.optimizer.state[syn.images]['momentum_buffer'].dtype == torch.float32


def test_amp_computes_in_bfloat16_and_only_when_asked():
    net = utils.get_network('ConvNetW32', 1, 3, (12, 12), 'cpu')
    x = torch.randn(4, 1, 12, 12)
    with autocast(namespace(amp=True)):
        assert net.features[0](x).dtype == torch.bfloat16  # the convolutions
        loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(4, dtype=torch.long))
        assert net(x).dtype == torch.bfloat16 and loss.dtype == torch.float32  # the loss in float32
    with autocast(namespace(amp=False)):
        assert net.features[0](x).dtype == torch.float32


@pytest.mark.slow  # (bfloat16 on a CPU without it: seconds on a quiet machine, minutes on a loaded one)
def test_evaluation_under_amp_learns():
    x, y = separable(5, 0)
    xt, yt = separable(20, 1)
    args = namespace(num_eval=2, epoch_eval_train=20, lr_net=0.03, dsa=False, dataset='X',
                     seed=0)  # (bfloat16 on a CPU is slow: few epochs)
    for amp in (True, False):
        args.amp = amp
        accs = utils.evaluate_models(x, y, ['ConvNetW32'], args, tensor_loader(xt, yt, 256), info(10))['ConvNetW32']
        assert min(accs) > 0.8, (amp, accs)
