"""--eval_together: the evaluation models of an architecture trained as one batched computation (torch.func.vmap
over their stacked parameters), for GPUs, which many small models leave idle. utils.evaluate_models calls it; the
papers' API (utils.py with networks.py) does not need this file."""
import copy

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import Group, augmented, decayed, eval_schedule, generator, get_network, get_time, say, set_seed, test_epochs, untouched_rng

# device types on which the models' test passes run one by one, not through vmap, whose grouped convolutions are
# slower there (same logits; docs/speed.md)
TEST_ONE_BY_ONE = ('cpu',)


def train_together(model_eval, keys, images, labels, testloader, args, data, train_criterion=None):
    """len(keys) models of one architecture without BatchNorm, trained on the synthetic set and tested as
    one batched computation (their parameters stacked, torch.func.vmap over them), with the protocol of
    train_and_test. Each model has its own initialisation, batch order and augmentation draws, from its
    own random stream (keys[m]), so each accuracy is a draw from the same distribution as when trained
    alone. Returns the test accuracies and each model's accuracies at test_epochs(args)."""
    from torch.func import functional_call, stack_module_state, vmap
    nets = []
    for k in keys:
        set_seed(*k)
        nets.append(get_network(model_eval, data.channel, data.num_classes, data.im_size, args.device))
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to('meta')
    # --amp: autocast does not reach inside vmap's batched convolutions (a bfloat16 input met a float32
    # bias), so the models run on bfloat16 copies of their float32 parameters, as autocast would do
    amp = getattr(args, 'amp', False)

    def one(p, b, x):  # one model's logits
        if amp:
            p, x = {k: v.to(torch.bfloat16) for k, v in p.items()}, x.to(torch.bfloat16)
        with torch.autocast(torch.device(args.device).type, enabled=False):
            return functional_call(base, (p, b), (x,)).float()

    def run(p, b, x, in_dims=0):  # every model's logits, [M, batch, classes]
        return vmap(one, in_dims=(0, 0, in_dims))(p, b, x)

    def test(x):  # every model on the same test images
        if torch.device(args.device).type not in TEST_ONE_BY_ONE:
            return run(params, buffers, x, in_dims=None)
        return torch.stack([one({k: v[m] for k, v in params.items()}, {k: v[m] for k, v in buffers.items()}, x)
                            for m in range(M)])

    streams = [generator(*k, 'training') for k in keys]
    lr, M = float(args.lr_net), len(keys)
    epochs, decay_after, fresh = eval_schedule(args)
    optimizer = torch.optim.SGD(params.values(), lr=lr, momentum=0.9, weight_decay=0.0005)
    images, labels = images.detach().to(args.device), labels.to(args.device)
    def test_all():  # every model's test accuracy
        base.eval()
        right, count = torch.zeros(M, device=args.device), 0
        with torch.no_grad():
            for x, y in testloader:
                x, y = x.to(args.device), y.to(args.device)
                right += (test(x).argmax(-1) == y).sum(1)
                count += len(y)
        base.train()
        return (right / max(count, 1)).tolist()

    tests, curve = test_epochs(args)[:-1], []
    for ep in tqdm(range(epochs), desc=f'training {M} evaluation models {model_eval}', leave=False, dynamic_ncols=True,
                   disable=not Group.current().main):
        orders = torch.stack([torch.randperm(len(images), generator=g) for g in streams]).to(args.device)
        for idx in orders.split(args.batch_train, dim=1):  # [M, batch]: each model its own batch
            x = torch.stack([augmented(images[i], args, g) for i, g in zip(idx, streams)])
            y = labels[idx].flatten(0, 1)  # (class indices, or soft labels [M * batch, classes])
            if hasattr(train_criterion, 'relabel'):  # (a teacher labelling every augmented batch)
                y = train_criterion.relabel(x.flatten(0, 1), y)
            loss = (train_criterion or F.cross_entropy)(run(params, buffers, x).flatten(0, 1), y) * M
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # (the sum of the models' mean losses: each model gets its own gradient)
            optimizer.step()
        if ep == decay_after:
            optimizer = decayed(optimizer, params.values(), lr * 0.1, fresh)
        if ep + 1 in tests:
            with untouched_rng(args):
                curve.append(test_all())
    accs = test_all()
    say('%s Evaluate %d %s together: epochs = %04d, test acc = %s' % (
        get_time(), M, model_eval, int(args.epoch_eval_train), ' '.join('%.4f' % a for a in accs)))
    return accs, [list(c) for c in zip(*curve, accs)]
