//! `gradcam eval`: the flags and the run are `gradcam_eval::cli`'s; here the default weights
//! are resolved and the summary printed.

use std::{io::Write, process::ExitCode};

use gradcam_eval::{cli::EvalArgs, ModelRef};

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let model = args.check()?;
    let weights = match &model {
        ModelRef::Classifier(name) => crate::weights::resolve(name, args.weights.as_deref())?,
        _ => args.weights.clone(),
    };
    let bar = crate::progress::bar(0, "images");
    let report = args.run(&model, weights.as_deref(), &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", report.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    write!(stdout, "{}", report.table)?;
    if let Some(out) = &args.out {
        writeln!(stdout, "\nper-{} results in {}", if report.adversarial { "case" } else { "image" }, out.join("results.jsonl").display())?;
        if args.failures > 0 && !report.adversarial {
            writeln!(stdout, "failure cases in {}", out.join("failures/index.html").display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
