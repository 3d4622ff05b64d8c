"""``brmerge plan CAMPAIGN``: a worker's memory by component, whether it fits the GPU, the
cheapest fix when it does not, and the predicted seconds per trial; no weights are loaded
(except with ``--calibrate``)."""

from __future__ import annotations

import argparse
import json

HELP = "predict a worker's memory and a campaign's speed on a GPU before paying for it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from search.sizing import CPU, GPUS

    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--gpu", choices=[*GPUS, CPU], default=None,
                   help="the workers' device (default: this machine's first GPU, else cpu)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help="the device's memory in GiB, when it differs from --gpu's table entry")
    p.add_argument("--calibrate", action="store_true",
                   help="time one merge and one forward of the largest batch here (loads the weights) "
                        "and predict seconds from those timings")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from search.campaign import load_campaign
    from search.sizing_inputs import local_device
    from search.sizing_report import calibrate, lines, plan_campaign

    campaign = load_campaign(args.campaign)
    gpu, gib = (args.gpu, None) if args.gpu else local_device()
    gib = args.gpu_memory if args.gpu_memory is not None else gib
    plan = plan_campaign(campaign, gpu=gpu, memory_gib=gib)
    if args.calibrate:
        plan = plan_campaign(campaign, gpu=gpu, memory_gib=gib, rates=calibrate(campaign, plan))
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print("\n".join(lines(plan)))
    return 0
