"""Audit a real Flower simulation round by round.

K simulated clients (Ray workers) train a zoo model on scikit-learn's digits with FedAvg for R rounds; the
server's strategy is wrapped in gradleak's leakage audit, which reconstructs every client's batch from its
update, measures PSNR/SSIM through the simulation-only truth channel, prints one line per round and writes

    DIR/leakage.json   every record (round, client, residual, psnr, ssim, replay assumptions), the worst round
    DIR/leakage.png    leakage over rounds
    DIR/index.html     one page over every round and client, linking each record's report
    DIR/round-RRR/CLIENT/   that update's reconstruction report

Usage:  python examples/flower_audit.py --rounds 3 --clients 2 --out audit/
        (needs ``pip install -c constraints.txt ".[fl]"``)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--clients", type=int, default=2, help="simulated clients (default 2)")
    p.add_argument("--out", required=True, help="output directory of the audit")
    p.add_argument("--model", default="mlp", help="zoo model (default mlp; e.g. lenet with --attack ig)")
    p.add_argument("--width", type=int, default=64, help="MLP width (default 64)")
    p.add_argument("--attack", default="fc-analytic", help="attack name (default fc-analytic: closed form)")
    p.add_argument("--iterations", type=int, default=None, help="iteration budget of an optimisation attack")
    p.add_argument("--batch", type=int, default=1, help="examples each client trains on per round (default 1)")
    p.add_argument("--local-steps", type=int, default=2, help="local SGD steps per round (default 2)")
    p.add_argument("--local-lr", type=float, default=0.1, help="local learning rate (default 0.1)")
    p.add_argument("--local-batch-size", type=int, default=None, help="local mini-batch (default: --batch)")
    p.add_argument("--api", choices=("message", "legacy"), default="message",
                   help="Flower's current Message API (default) or the legacy Strategy API")
    p.add_argument("--no-truth", action="store_true", help="no truth channel: residual only, no PSNR")
    p.add_argument("--no-report", action="store_true",
                   help="clients do not report their replay settings (the audit states what it assumes)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for Ray (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    import gradleak as gl
    from gradleak.integrations.flower import LeakageAudit, LegacyLeakageAudit, SimulationTruth
    from gradleak.integrations.flower import simulation as sim

    try:
        if args.rounds < 1 or args.clients < 1:
            raise gl.ValidationError("flower_audit", [f"--rounds and --clients must be >= 1, got {args.rounds} and "
                                                      f"{args.clients}"])
        options = {"width": args.width} if args.model == "mlp" else {}
        fed = sim.DigitsFederation(clients=args.clients, model=args.model, model_options=options, batch=args.batch,
                                   local_steps=args.local_steps, local_lr=args.local_lr,
                                   local_batch_size=args.local_batch_size, report=not args.no_report)
        attack_options = {}
        if args.iterations is not None:
            budget = getattr(gl.attacks.attacks.get(args.attack), "budget_option", None)
            if budget is None:
                raise gl.ValidationError("flower_audit", [f"--iterations: attack {args.attack!r} has no iteration "
                                                          "budget"])
            attack_options[budget] = args.iterations
        attack = gl.create(args.attack, **attack_options)
        truth = None if args.no_truth else SimulationTruth()
        audit_options = dict(attack=attack, out_dir=args.out, truth=truth, local_lr=args.local_lr,
                             dtype=torch.float64 if args.attack == "fc-analytic" else None)
        k = args.clients
        if args.api == "message":
            from flwr.serverapp.strategy import FedAvg

            strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=k)
            audit = LeakageAudit(strategy, fed.build_model(), fed.spec, **audit_options)
            sim.run(fed, [audit], rounds=args.rounds, truth=truth, num_cpus=args.cpus)
        else:
            from flwr.server.strategy import FedAvg

            strategy = FedAvg(fraction_evaluate=0.0, min_fit_clients=k, min_available_clients=k,
                              on_fit_config_fn=sim.fit_config)
            audit = LegacyLeakageAudit(strategy, fed.build_model(), fed.spec, **audit_options)
            sim.run_legacy(fed, audit, rounds=args.rounds, truth=truth, num_cpus=args.cpus)
            audit.auditor.finish()
        if truth is not None:
            truth.close()
    except gl.GradleakError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = audit.summary_dict()
    print(f"[gradleak] {len(summary['records'])} client updates audited over {args.rounds} round(s) in "
          f"{time.perf_counter() - t0:.1f} s; leakage.json, leakage.png and index.html in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
