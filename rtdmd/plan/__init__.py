from rtdmd.plan.simulate import simulate  # noqa: F401
