# Monthly snapshots (previous_dataset): the change report, after the last round and verification.
rule snapshot_report:
    input:
        verification=verification_report(),
        done=final_round_done,
    output:
        json=snapshot_report_file("json"),
        csv=report(snapshot_report_file("csv"), caption="report/snapshot.rst", category="Verification"),
    log:
        log_file("snapshot_report"),
    conda:
        "../envs/environment.yaml"
    params:
        stage="snapshot_report",  # provenance only: see rules/initialize.smk
    script:
        "../workflow_scripts/run_stage.py"
