rule initialize:
    input:
        config["path_to_input"],
    output:
        urls_manifest(),
    log:
        log_file("initialize"),
    conda:
        "../envs/environment.yaml"
    params:
        snapshot=snapshot_params(),
    script:
        "../workflow_scripts/run_stage.py"
