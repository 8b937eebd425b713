from pipeline.cli import main
from pipeline.rank_exit import launched_rank, leave

code = main()
if launched_rank():
    leave(code)
raise SystemExit(code)
