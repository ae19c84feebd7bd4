rule initialize:
    input:
        config["path_to_input"],
    output:
        urls_manifest(),
    conda:
        "../envs/environment.yaml"
    log:
        log_file("initialize"),
    params:
        stage="initialize",
        snapshot=snapshot_params(),
    script:
        "../workflow_scripts/run_stage.py"
