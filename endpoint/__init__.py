"""The endpoint agent: runs a server's tasks on this machine's worker processes.

Start one from the shell with ``heartline endpoint start --name NAME``, or::

    from heartline.endpoint import AgentConfig, run_agent
    run_agent(AgentConfig(name="local", workers=4))
"""

from heartline.endpoint._agent import Agent, run_agent
from heartline.endpoint._config import AgentConfig

__all__ = ["Agent", "AgentConfig", "run_agent"]
