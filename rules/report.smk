rule report_plots:
    input:
        verification=verification_report(),
        done=final_round_done,
    output:
        throughput=report(plot_file("throughput"), caption="report/throughput.rst", category="Download"),
        errors=report(plot_file("errors_by_server"), caption="report/errors.rst", category="Download"),
        rates=report(plot_file("rate_over_time"), caption="report/rates.rst", category="Politeness"),
    log:
        log_file("report_plots"),
    conda:
        "../envs/environment.yaml"
    params:
        stage="report_plots",  # provenance only: see rules/initialize.smk
    script:
        "../workflow_scripts/run_stage.py"
