rule verify:
    input:
        done=final_round_done,
        manifest=urls_manifest(),
    output:
        json=verification_report(),
        csv=report(str(PATHS.reports / "server_summary.csv"), caption="report/summary.rst", category="Verification"),
    log:
        log_file("verify"),
    conda:
        "../envs/environment.yaml"
    params:
        stage="verify",  # provenance only: see rules/initialize.smk
    script:
        "../workflow_scripts/run_stage.py"
