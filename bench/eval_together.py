"""20 evaluation ConvNets on a Fashion-MNIST synthetic set (ipc 1 and 10, initialised from real images),
trained one at a time vs together (--eval_together), in float32 and with --amp, in one process. Training
dominates: 100 / ipc epochs and a 256-image test set. Every row also gives the matrix rates measured just
before it.

    OMP_NUM_THREADS=1 python bench/eval_together.py --data_path data
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import utils  # noqa: E402
from papers import matrix_rates  # noqa: E402
from speed import setup  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
p.add_argument('--data_path', default='/tmp/bench_data')
p.add_argument('--num_eval', type=int, default=20)
a = p.parse_args()
for ipc in (1, 10):
    for amp in (False, True):
        args, real, testloader, syn = setup('FashionMNIST', ipc, a, *(['--amp'] if amp else []))
        x, y = next(iter(testloader))
        test = [(x[:256], y[:256])]
        args.epoch_eval_train = 100 // ipc
        seconds = {}
        for together in (False, True):
            args.num_eval, args.eval_together = a.num_eval, together
            rates = matrix_rates()
            t = time.perf_counter()
            utils.evaluate_models(syn.images, syn.labels, ['ConvNet'], args, test)
            seconds[together] = (time.perf_counter() - t) / a.num_eval
        print(json.dumps(dict(ipc=ipc, amp=amp, epochs=args.epoch_eval_train, num_eval=a.num_eval,
                              seconds_per_model_alone=round(seconds[False], 3),
                              seconds_per_model_together=round(seconds[True], 3),
                              speedup=round(seconds[False] / seconds[True], 2),
                              fp32_GFLOPs=round(rates['float32'], 1), bf16_GFLOPs=round(rates['bfloat16'], 1))),
              file=sys.__stdout__, flush=True)
