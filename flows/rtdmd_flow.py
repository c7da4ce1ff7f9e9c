"""RTDMD pipeline: prompt prep -> cold start (AC-DMD) -> RL (RTDMD) -> evaluation matrix -> register.

    python flows/rtdmd_flow.py run --backbone toy2d                  # local profile (the default)
    python flows/rtdmd_flow.py resume                                # after a failure: re-runs the
                                                                     # failed step onwards; training
                                                                     # continues from its checkpoint
    python flows/rtdmd_flow.py run --backbone toy2d --stages rl,eval --cold-start-uri <artifact URI>
    python flows/rtdmd_flow.py run --backbone toy2d --stages eval --rl-uri <artifact URI>
    python flows/rtdmd_flow.py --datastore=s3 \\
        --config-value deploy '{"profile": "kubernetes", "backbone": "flux2_4b"}' argo-workflows create

Orchestration only: what each step does lives in ``rtdmd.pipeline`` (``plan``, ``training``,
``evaluation``, ``registration``); which decorators a
step gets (``@parallel`` locally; ``@torchrun`` + ``@kubernetes`` + ``@retry`` on a cluster) is
decided by the ``deploy`` Config through the ``rtdmd_profile`` mutator (``rtdmd.pipeline.profiles``).
Metaflow artifacts hold URIs, manifests and metrics — never tensors.

Graph::

    start -> prep -> cold_start (num_parallel = nodes) -> cold_start_join -> rl_init
          -> rl (num_parallel = nodes) -> rl_join -> eval_plan -> eval_variant (foreach) -> eval_join
          -> register -> end
"""
from metaflow import Config, FlowMutator, FlowSpec, Parameter, card, config_expr, current, step

from rtdmd.pipeline import profiles


class rtdmd_profile(FlowMutator):  # noqa: N801 - used as a decorator
    """Adds the compute profile's decorators (see rtdmd/pipeline/profiles.py)."""

    def pre_mutate(self, mutable_flow):
        profiles.apply_profile(mutable_flow, "deploy")


@rtdmd_profile
class RtdmdFlow(FlowSpec):
    deploy = Config("deploy", default_value=profiles.default_deploy_config,
                    help="compute profile: {\"profile\": \"local\"|\"kubernetes\", \"backbone\": ..., "
                         "\"overrides\": [...], \"retries\": null|int, \"kubernetes\": {...}}")
    backbone = Parameter("backbone", default=config_expr("deploy.backbone"),
                         help="params/<backbone>.yaml (or a params YAML path)")
    overrides = Parameter("overrides", default="",
                          help="space-separated dotted params overrides, e.g. 'rl.epochs=20 cold_start.total_steps=300'")
    stages = Parameter("stages", default="all", help="comma-separated subset of prep,cold_start,rl,eval (or 'all')")
    cold_start_uri = Parameter("cold-start-uri", default="",
                               help="existing cold-start artifact: RL (and evaluation) start from it")
    rl_uri = Parameter("rl-uri", default="", help="existing RL artifact to evaluate (with --stages eval)")
    full_cold_start = Parameter("full-cold-start", type=bool, default=False,
                                help="run the whole cold-start schedule, not only up to the milestone RL starts from")
    eval_args = Parameter("eval-args", default="",
                          help="extra `python -m rtdmd.eval` options, e.g. '--samples-per-prompt 256 --allow-unavailable'")

    @step
    def start(self):
        from rtdmd.pipeline import plan

        self.ctx = plan.plan_run(flow=current.flow_name, run_id=current.run_id, origin_run_id=current.origin_run_id,
                              backbone=self.backbone, overrides=self.overrides, stages=self.stages,
                              cold_start_uri=self.cold_start_uri, rl_uri=self.rl_uri,
                              deploy=dict(self.deploy), pathspec=current.pathspec, eval_args=self.eval_args,
                              full_cold_start=bool(self.full_cold_start))
        print(plan.describe_plan(self.ctx))
        self.next(self.prep)

    @step
    def prep(self):
        from rtdmd.pipeline import training

        self.built = training.ensure_model_assets(self.ctx)  # tiny/toy2d models, once, before any torchrun
        self.prep_info = training.run_prep(self.ctx, current.pathspec) if "prep" in self.ctx.stages else None
        self.next(self.cold_start, num_parallel=self.ctx.plans["cold_start"].nodes)

    @card(type="blank", id="training", timeout=300, refresh_interval=10)
    @step
    def cold_start(self):
        from rtdmd.pipeline import cards, live, training

        node, nodes = current.parallel.node_index, current.parallel.num_nodes
        self.node_index = node
        self.cold_start_out = None
        if "cold_start" in self.ctx.stages:
            with live.live_training_card(self.ctx, "cold_start", node):  # the card follows training
                self.cold_start_out = training.run_training(self.ctx, "cold_start", init_uri=None, prep=self.prep_info,
                                                            pathspec=current.pathspec, node_index=node, num_nodes=nodes,
                                                            while_training=lambda: cards.warm_imports(self.ctx))
        cards.attach(cards.safe(cards.training_card, self.ctx, "cold_start", self.cold_start_out, node_index=node,
                                num_nodes=nodes))
        self.next(self.cold_start_join)

    @step
    def cold_start_join(self, inputs):
        node0 = next(i for i in inputs if i.node_index == 0)
        self.cold_start_out = node0.cold_start_out
        self.merge_artifacts(inputs, exclude=["node_index", "cold_start_out"])
        self.next(self.rl_init)

    @step
    def rl_init(self):
        """The RL init: this run's cold start, or the given --cold-start-uri (checksums verified)."""
        from rtdmd.pipeline import training

        if self.cold_start_out is None and self.ctx.given["cold_start"]:
            uri = self.ctx.given["cold_start"]
            manifest = training.verify_artifact(uri)
            self.cold_start_out = {"uri": uri, "manifest": {k: v for k, v in manifest.items() if k != "files"}}
        self.next(self.rl, num_parallel=self.ctx.plans["rl"].nodes)

    @card(type="blank", id="training", timeout=300, refresh_interval=10)
    @step
    def rl(self):
        from rtdmd.pipeline import cards, live, training

        node, nodes = current.parallel.node_index, current.parallel.num_nodes
        self.node_index = node
        self.rl_out = None
        if "rl" in self.ctx.stages:
            with live.live_training_card(self.ctx, "rl", node):  # the card follows training
                self.rl_out = training.run_training(self.ctx, "rl", init_uri=self.cold_start_out["uri"], prep=self.prep_info,
                                                    pathspec=current.pathspec, node_index=node, num_nodes=nodes,
                                                    while_training=lambda: cards.warm_imports(self.ctx))
        cards.attach(cards.safe(cards.training_card, self.ctx, "rl", self.rl_out, node_index=node, num_nodes=nodes))
        self.next(self.rl_join)

    @step
    def rl_join(self, inputs):
        node0 = next(i for i in inputs if i.node_index == 0)
        self.rl_out = node0.rl_out
        self.merge_artifacts(inputs, exclude=["node_index", "rl_out"])
        self.next(self.eval_plan)

    @step
    def eval_plan(self):
        from rtdmd.pipeline import evaluation, training

        if self.rl_out is None and self.ctx.given["rl"]:
            uri = self.ctx.given["rl"]
            manifest = training.verify_artifact(uri)
            self.rl_out = {"uri": uri, "manifest": {k: v for k, v in manifest.items() if k != "files"}}
        cold = (self.cold_start_out or {}).get("uri")
        rl = (self.rl_out or {}).get("uri")
        self.variants = evaluation.eval_variants(self.ctx, cold, rl) if "eval" in self.ctx.stages else []
        print("evaluation variants: " + (", ".join(f"{v['name']}={v['spec']}" for v in self.variants) or "(none)"))
        # a foreach needs at least one split: without evaluation one no-op branch runs
        self.variants = self.variants or [None]
        self.next(self.eval_variant, foreach="variants")

    @step
    def eval_variant(self):
        from rtdmd.pipeline import evaluation

        self.eval_result = None
        if self.input is not None:
            self.eval_result = evaluation.run_eval_variant(self.ctx, self.input, prep=self.prep_info, pathspec=current.pathspec)
        self.next(self.eval_join)

    @card(type="blank", id="evaluation", timeout=300)
    @step
    def eval_join(self, inputs):
        from rtdmd.pipeline import cards, evaluation

        results = [i.eval_result for i in inputs if i.eval_result is not None]
        self.merge_artifacts(inputs, exclude=["eval_result"])
        self.matrix = evaluation.merge_eval(self.ctx, results, [v["name"] for v in self.variants if v]) if results else None
        cards.attach(cards.safe(cards.eval_card, self.ctx, self.matrix, results))
        self.next(self.register)

    @step
    def register(self):
        from rtdmd.pipeline import registration

        self.final = self.rl_out or self.cold_start_out
        self.summary = registration.register(self.ctx, final=self.final, cold_start=self.cold_start_out, matrix=self.matrix,
                                  pathspec=current.pathspec)
        self.next(self.end)

    @step
    def end(self):
        from rtdmd.pipeline import registration

        print(registration.where_to_look(self.ctx, self.matrix))


if __name__ == "__main__":
    RtdmdFlow()
