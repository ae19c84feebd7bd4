rule profile_servers:
    input:
        urls_manifest(),
    output:
        profiles=str(PATHS.profiles_table),
        ignored=str(PATHS.ignored_table),
    log:
        log_file("profile_servers"),
    conda:
        "../envs/environment.yaml"
    params:
        stage="profile_servers",  # provenance only: see rules/initialize.smk
    script:
        "../workflow_scripts/run_stage.py"
