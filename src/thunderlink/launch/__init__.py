"""thunderlink launch: start the ranks of a job (locally, or over ssh)."""

from .job import Job, JobResult, exit_status  # noqa: F401
from .local import free_ports, launch_local, private_tempdir, rank_env  # noqa: F401
