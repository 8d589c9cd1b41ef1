//! `gradcam eval`: the flags, the run and `eval merge` are `gradcam_eval::cli`'s; here the
//! default weights are resolved and the summary printed.

use std::{io::Write, process::ExitCode};

use gradcam_eval::{cli::EvalArgs, ModelRef};

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let report = match args.merge() {
        Some(merged) => merged?,
        None => {
            let model = args.check()?;
            let weights = match &model {
                ModelRef::Classifier(name) => crate::weights::resolve(name, args.weights.as_deref())?,
                _ => args.weights.clone(),
            };
            let bar = crate::progress::bar(0, "images");
            let report = args.run(&model, weights.as_deref(), &mut |i, n| {
                bar.set_length(n as u64);
                bar.set_position(i as u64);
                bar.set_message(format!("{:.2} images/s", bar.per_sec()));
            })?;
            bar.finish_and_clear();
            report
        }
    };
    let mut stdout = std::io::stdout().lock();
    if args.prints_json() {
        writeln!(stdout, "{}", report.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    write!(stdout, "{}{}", report.table, report.files)?;
    Ok(ExitCode::SUCCESS)
}
