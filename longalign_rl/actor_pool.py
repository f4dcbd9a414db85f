"""What the sampler actors (sampling/group.py) and the reward actors (reward_actors.py) share:
a pool of N Ray actors of one class with the resources their config section asks for, made
on the driver and pickled (the actor handles) into every trainer worker; the wait until
every actor is built, which names an actor's own exception; the pause before a failed call
goes to the next actor; shutdown.
"""

from __future__ import annotations

import time

import ray

from longalign_rl.config import ConfigError
from longalign_rl.console import actor_cause


class ActorPool:
    """`count` actors of `actor_class`, actor i built as actor_class(*args, i). Ray restarts
    one whose process dies up to `max_restarts` times; a failed call is never retried by
    Ray (max_task_retries=0): the clients decide where it goes next."""

    def __init__(self, actor_class, count: int, args: tuple, *, num_cpus: float, num_gpus: float, max_restarts: int,
                 resources: dict | None = None, runtime_env: dict | None = None):
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0,
                       resources=dict(resources or {}))
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actors = [actor_class.options(**options).remote(*args, i) for i in range(count)]

    def wait_built(self, call, what: str, errors: tuple = (ray.exceptions.RayActorError,)) -> None:
        """Block until `call(actor)` (an actor method's ObjectRef) has answered on every actor,
        or ConfigError "`what`: the actor's own exception" (Ray does not restart an actor whose
        constructor raised); the pool is shut down then."""
        try:
            ray.get([call(actor) for actor in self.actors])
        except errors as e:
            self.shutdown()
            raise ConfigError(f"{what}: {actor_cause(e)}") from None
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def backoff(failures: int, deadline: float | None = None) -> None:
    """The pause before the `failures`-th retry on another actor: 2, 4, 8, then 10 s (a
    restarted actor rebuilds its model), never past `deadline` (time.monotonic())."""
    pause = min(2.0 ** failures, 10.0)
    if deadline is not None:
        pause = min(pause, max(deadline - time.monotonic(), 0.0))
    time.sleep(pause)
