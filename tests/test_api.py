"""The papers' API is a contract: follow-up code imports these names from utils.py and networks.py, with the
papers' signatures and return values, and utils.py stays importable (and copyable) without the harness."""
import argparse
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import networks
import utils
from helpers import ROOT, write_mnist

# name: the papers' parameters, in order (ours may add parameters with defaults after them)
UTILS_API = {
    'get_loops': ['ipc'],
    'get_dataset': ['dataset', 'data_path'],
    'get_network': ['model', 'channel', 'num_classes', 'im_size'],
    'get_eval_pool': ['eval_mode', 'model', 'model_eval'],
    'evaluate_synset': ['it_eval', 'net', 'images_train', 'labels_train', 'testloader', 'args'],
    'get_daparam': ['dataset', 'model', 'model_eval', 'ipc'],
    'match_loss': ['gw_syn', 'gw_real', 'args'],
    'get_time': [],
    'TensorDataset': ['images', 'labels'],
    'epoch': ['mode', 'dataloader', 'net', 'optimizer', 'criterion', 'args', 'aug'],
    'DiffAugment': ['x', 'strategy', 'seed', 'param'],
    'ParamDiffAug': [],
}
NETWORKS_API = {
    'MLP': ['channel', 'num_classes'],
    'ConvNet': ['channel', 'num_classes', 'net_width', 'net_depth', 'net_act', 'net_norm', 'net_pooling', 'im_size'],
    'LeNet': ['channel', 'num_classes'],
    'AlexNet': ['channel', 'num_classes'],
    'AlexNetBN': ['channel', 'num_classes'],
    'VGG11': ['channel', 'num_classes'],
    'VGG11BN': ['channel', 'num_classes'],
    'ResNet18': ['channel', 'num_classes'],
    'ResNet18BN_AP': ['channel', 'num_classes'],
    'ResNet18BN': ['channel', 'num_classes'],
}


def check_signature(fn, papers):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:len(papers)]] == papers, fn
    assert all(p.default is not inspect.Parameter.empty for p in params[len(papers):]), fn  # extras are optional


@pytest.mark.parametrize('name', UTILS_API)
def test_utils_has_the_papers_names_and_signatures(name):
    check_signature(getattr(utils, name), UTILS_API[name])


@pytest.mark.parametrize('name', NETWORKS_API)
def test_networks_has_the_papers_classes_and_signatures(name):
    check_signature(getattr(networks, name), NETWORKS_API[name])


@pytest.mark.parametrize('name', [n for n in NETWORKS_API if n != 'ConvNet'])
@pytest.mark.parametrize('channel, size', [(1, 28), (3, 32)])
def test_the_papers_constructors_infer_the_image_size_from_the_channels(name, channel, size):
    """The papers' (channel, num_classes): 1-channel models take 28x28 images, 3-channel ones 32x32; the same
    network as get_network builds for that size, parameter for parameter."""
    torch.manual_seed(0)
    net = getattr(networks, name)(channel, 7)
    torch.manual_seed(0)
    ours = utils.get_network(name, channel, 7, (size, size), 'cpu')
    x = torch.randn(2, channel, size, size)
    net.eval(), ours.eval()
    assert torch.equal(net(x), ours(x)) and net(x).shape == (2, 7)
    assert torch.equal(net.embed(x), ours.embed(x))


def test_convnet_takes_the_papers_arguments_positionally_and_by_keyword():
    torch.manual_seed(0)
    a = networks.ConvNet(1, 10, 64, 2, 'relu', 'instancenorm', 'avgpooling', (28, 28))
    torch.manual_seed(0)
    b = networks.ConvNet(channel=1, num_classes=10, net_width=64, net_depth=2, net_act='relu', net_norm='instancenorm',
                         net_pooling='avgpooling', im_size=(28, 28))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(a(x), b(x)) and a.embed(x).shape == (3, 64 * 8 * 8)  # 28x28 padded to 32x32 maps


def test_get_dataset_returns_the_papers_nine_values(tmp_path):
    write_mnist(tmp_path, n_train=20, n_test=10)
    out = utils.get_dataset('MNIST', str(tmp_path))
    assert len(out) == 9
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = out
    assert (channel, tuple(im_size), num_classes, len(class_names)) == (1, (28, 28), 10, 10)
    assert mean == [0.1307] and std == [0.3081]
    image, label = dst_train[3]  # the papers index the dataset one image at a time
    assert image.shape == (1, 28, 28) and int(label) == 3
    assert len(dst_test) == 10 and sum(len(y) for _, y in testloader) == 10


def test_importing_utils_leaves_the_harness_and_the_process_alone():
    """utils imports networks and libraries only (never runs.py), and importing it changes nothing in the
    importing process: no allocator tuning, no signal handlers, no output."""
    code = textwrap.dedent('''
        import signal, sys
        before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
        import utils
        assert 'runs' not in sys.modules, 'utils imported the harness'
        assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
        own = {m for m in sys.modules if m in ('main', 'main_DM', 'distill', 'CL_DM', 'evaluate', 'runs')}
        assert not own, own
    ''')
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout == '', p.stderr[-1000:]
    with open(os.path.join(ROOT, 'utils.py')) as f:
        source = f.read()
    assert 'import runs' not in source and 'from runs' not in source and 'mallopt' not in source


PAPERS_CLIENT = '''
# The calls of the papers' main.py (DC/DSA) and main_DM.py, on our utils.py and networks.py.
import argparse, sys
import numpy as np
import torch
import torch.nn as nn
from utils import (get_loops, get_dataset, get_network, get_eval_pool, evaluate_synset, get_daparam, match_loss,
                   get_time, TensorDataset, epoch, DiffAugment, ParamDiffAug)
from networks import ConvNet

args = argparse.Namespace(method=sys.argv[1], dataset='MNIST', model='ConvNet', ipc=1, eval_mode='S', num_exp=1,
                          num_eval=1, epoch_eval_train=2, Iteration=1, lr_img=0.1, lr_net=0.01, batch_real=8,
                          batch_train=256, init='real', dsa_strategy='color_crop_cutout_flip_scale_rotate',
                          data_path=sys.argv[2], dis_metric='ours', device='cpu')
args.outer_loop, args.inner_loop = get_loops(args.ipc)
args.dsa_param = ParamDiffAug()
args.dsa = args.method in ('DSA', 'DM')
channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset(args.dataset, args.data_path)
model_eval_pool = get_eval_pool(args.eval_mode, args.model, args.model)
images_all = [torch.unsqueeze(dst_train[i][0], dim=0) for i in range(len(dst_train))]
labels_all = [dst_train[i][1] for i in range(len(dst_train))]
indices_class = [[] for c in range(num_classes)]
for i, lab in enumerate(labels_all):
    indices_class[int(lab)].append(i)
images_all = torch.cat(images_all, dim=0).to(args.device)
labels_all = torch.tensor([int(l) for l in labels_all], dtype=torch.long, device=args.device)

def get_images(c, n):
    idx_shuffle = np.random.permutation(indices_class[c])[:n]
    return images_all[idx_shuffle]

image_syn = torch.cat([get_images(c, args.ipc).detach().data for c in range(num_classes)]).requires_grad_(True)
label_syn = torch.tensor([np.ones(args.ipc) * i for i in range(num_classes)], dtype=torch.long).view(-1)
optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
print('%s training begins' % get_time())
net = get_network(args.model, channel, num_classes, im_size).to(args.device)
net.train()
optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
criterion = nn.CrossEntropyLoss().to(args.device)
if args.method == 'DM':
    net_params = list(net.parameters())
    for p in net_params:
        p.requires_grad = False
    loss = torch.tensor(0.0)
    for c in range(num_classes):
        img_real, img_syn = get_images(c, args.batch_real), image_syn[c * args.ipc:(c + 1) * args.ipc]
        seed = int(1000 * 0.5)
        img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
        img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
        loss += torch.sum((torch.mean(net.embed(img_real).detach(), dim=0) - torch.mean(net.embed(img_syn), dim=0)) ** 2)
else:
    net_parameters = list(net.parameters())
    loss = torch.tensor(0.0)
    for c in range(num_classes):
        img_real, img_syn = get_images(c, args.batch_real), image_syn[c * args.ipc:(c + 1) * args.ipc]
        lab_real = torch.ones((img_real.shape[0],), device=args.device, dtype=torch.long) * c
        lab_syn = torch.ones((args.ipc,), device=args.device, dtype=torch.long) * c
        if args.dsa:
            seed = int(1000 * 0.5)
            img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
            img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
        gw_real = list((_.detach().clone() for _ in torch.autograd.grad(criterion(net(img_real), lab_real), net_parameters)))
        gw_syn = torch.autograd.grad(criterion(net(img_syn), lab_syn), net_parameters, create_graph=True)
        loss += match_loss(gw_syn, gw_real, args)
optimizer_img.zero_grad()
loss.backward()
optimizer_img.step()
image_syn_train, label_syn_train = image_syn.detach().clone(), label_syn.detach().clone()
dst_syn_train = TensorDataset(image_syn_train, label_syn_train)
trainloader = torch.utils.data.DataLoader(dst_syn_train, batch_size=args.batch_train, shuffle=True, num_workers=0)
if args.method != 'DM':
    for p in net.parameters():
        p.requires_grad = True
    loss_avg, acc_avg = epoch('train', trainloader, net, optimizer_net, criterion, args, aug=True if args.dsa else False)
for model_eval in model_eval_pool:
    args.dc_aug_param = get_daparam(args.dataset, args.model, model_eval, args.ipc)
    net_eval = get_network(model_eval, channel, num_classes, im_size).to(args.device)
    _, acc_train, acc_test = evaluate_synset(0, net_eval, image_syn.detach().clone(), label_syn.detach().clone(),
                                             testloader, args)
    print('RESULT', args.method, model_eval, float(loss), acc_train, acc_test)
'''


@pytest.mark.parametrize('method', ['DC', 'DSA', 'DM'])
def test_the_papers_calls_run_on_our_files(tmp_path, method):
    """A client that uses every public name as the papers' main.py and main_DM.py do runs and gives numbers."""
    write_mnist(tmp_path / 'data', n_train=40, n_test=20)
    script = tmp_path / 'client.py'
    script.write_text(PAPERS_CLIENT)
    p = subprocess.run([sys.executable, str(script), method, str(tmp_path / 'data')], capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
    assert p.returncode == 0, p.stderr[-2000:]
    result = [line.split() for line in p.stdout.splitlines() if line.startswith('RESULT')]
    assert [r[2] for r in result] == ['ConvNet']
    loss, acc_test = float(result[0][3]), float(result[0][5])
    assert loss > 0 and acc_test * 20 == round(acc_test * 20)  # a fraction of the 20 test images


def test_the_papers_main_dm_cases_run_on_our_files():
    """main_DM.py with --dsa_strategy none never sets args.dc_aug_param; on several GPUs it reaches
    net.module.embed (their get_network wrapped the net in DataParallel there)."""
    torch.manual_seed(0)
    net = utils.get_network('ConvNet', 1, 3, (28, 28), 'cpu')
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(net.module.embed(x), net.embed(x))
    args = argparse.Namespace(device='cpu', lr_net=0.01, epoch_eval_train=1, batch_train=4, dsa=False)
    labels = torch.tensor([0, 1, 2, 0])
    test = [(x, labels)]
    _, acc_train, acc_test = utils.evaluate_synset(0, net, x, labels, test, args)
    assert acc_test * 4 == round(acc_test * 4) and acc_train * 4 == round(acc_train * 4)
