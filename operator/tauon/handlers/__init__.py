"""Kopf wiring only. Importing this package registers every handler in Kopf's default registry."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import kopf

from tauon.api.names import FINALIZER, GROUP
from tauon.handlers import finetunejob, finetunesweep, inferenceservice, leader, progress
from tauon.handlers.runtime import RT
from tauon.kube.client import Kube, load_config

log = logging.getLogger("tauon.operator")


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own prefixes from day one (Kopf's defaults are kopf.zalando.org/...). We use only
    # on.event/index handlers, so Kopf stores no progress and adds no finalizers to user objects.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # k8s Events are posted explicitly, once per transition
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    await load_config()
    RT.kube = Kube()
    RT.trust_metrics_address = progress.dev_flag()
    if RT.trust_metrics_address:
        log.warning(
            "%s is set: reading /progress at the address pods publish (dev only)", progress.DEV_FLAG_ENV
        )
    RT.elector = leader.from_env(RT.kube, on_elected=_trigger_all)
    if RT.elector is not None:
        log.warning(
            "leader election on: Lease %s/%s as %s", RT.elector.namespace, RT.elector.name, RT.elector.me
        )
        RT.elector_task = asyncio.get_running_loop().create_task(RT.elector.run())
    RT.periodic = asyncio.get_running_loop().create_task(_periodic())


def _trigger_all() -> None:
    """Just elected: reconcile everything now rather than at the next periodic pass."""
    for ns, name in finetunejob.all_keys():
        RT.trigger(finetunejob.CONTROLLER, ns, name)
    for ns, name in inferenceservice.all_keys():
        RT.trigger(inferenceservice.CONTROLLER, ns, name)
    for ns, name in finetunesweep.all_keys():
        RT.trigger(finetunesweep.CONTROLLER, ns, name)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    await RT.stop()


@kopf.on.probe(id="reconciler")
def probe(**_: Any) -> str:
    """Liveness: the periodic pass runs and no reconcile outlived its deadline (a blocked loop)."""
    if RT.periodic is None or RT.periodic.done():
        raise kopf.PermanentError("the periodic pass is not running")  # permanent: answer 500 now
    stuck = RT.queue.stuck_for()
    if stuck > 0:
        raise kopf.PermanentError(f"a reconcile is {stuck:.0f}s past its deadline")
    return "ok"


async def _periodic() -> None:
    """Time-based rules (deadlines, timeouts, TTL) and progress refresh for every known object."""
    last_progress = 0.0
    loop = asyncio.get_running_loop()
    # trust_env=False (aiohttp's default, stated): pod-IP traffic never goes through an HTTP(S)_PROXY
    async with aiohttp.ClientSession(trust_env=False) as session:
        while True:
            await asyncio.sleep(RT.period_seconds)
            try:
                for ns, name in finetunejob.all_keys():
                    RT.trigger(finetunejob.CONTROLLER, ns, name)
                finetunejob.update_phase_gauge()
                for ns, name in inferenceservice.all_keys():
                    RT.trigger(inferenceservice.CONTROLLER, ns, name)
                inferenceservice.update_phase_gauge()
                for ns, name in finetunesweep.all_keys():
                    RT.trigger(finetunesweep.CONTROLLER, ns, name)
                finetunesweep.update_gauges()
                if RT.leading() and loop.time() - last_progress >= RT.progress_period_seconds:
                    last_progress = loop.time()
                    await finetunejob.fetch_progress(session)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("periodic pass failed")
