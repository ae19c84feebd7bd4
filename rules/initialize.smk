# params.stage (here and in the other rules that ran run_stage.py before issue #17) is no longer read:
# stages.STAGES is keyed by the rule's name. It stays because Snakemake reruns a rule whose params differ
# from those recorded for its outputs: without it every output folder written before reran from initialize
# on. tests/unit/test_rule_provenance.py.
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
        stage="initialize",
        snapshot=snapshot_params(),
    script:
        "../workflow_scripts/run_stage.py"
