rule profile_servers:
    input:
        urls_manifest(),
    output:
        profiles=str(PATHS.profiles_table),
        ignored=str(PATHS.ignored_table),
    conda:
        "../envs/environment.yaml"
    log:
        log_file("profile_servers"),
    params:
        stage="profile_servers",
    script:
        "../workflow_scripts/run_stage.py"
