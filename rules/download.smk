rule schedule:
    input:
        unpack(schedule_inputs),
    output:
        schedule_file("{round}"),
    log:
        log_file("schedule_round_{round}"),
    localrule: True
    conda:
        "../envs/environment.yaml"
    params:
        stage="schedule",  # provenance only: see rules/initialize.smk
    script:
        "../workflow_scripts/run_stage.py"


# One MPI job per round. Images go to an undeclared store (per-batch files + completion markers
# that the worker skips on rerun); only the small round marker is a declared output. A checkpoint:
# a round that leaves nothing to retry is the last one run (see final_round_done).
checkpoint download:
    input:
        schedule=schedule_file("{round}"),
    output:
        round_done("{round}"),
    log:
        log_file("download_round_{round}"),
    conda:
        "../envs/environment.yaml"
    threads: 1
    resources:
        nodes=config["downloader_parameters"]["max_nodes"],
        tasks=download_tasks(),
        cpus_per_task=config["downloader_parameters"]["cpu_per_worker"],
        mpi="mpiexec",
    params:
        python=PYTHON,
        worker=str(SCRIPTS_DIR / "download_worker.py"),
        empty=str(SCRIPTS_DIR / "empty_round.py"),
        mpi=mpi_launcher,
    shell:
        "{params.python:q} {params.empty:q} {input.schedule:q} {output:q} > {log:q} 2>&1"
        " || {params.mpi} -n {resources.tasks} {params.python:q} {params.worker:q}"
        " --tasks {resources.tasks} {input.schedule:q} {output:q} 2>&1 | tee {log:q}"
