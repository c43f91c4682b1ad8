fn main() {
    let dp = tollgate::Datapath::load(tollgate::DatapathOptions::new("/sys/fs/bpf/tg-smoke"));
    match dp {
        Ok(dp) => {
            println!("loaded");
            dp.remove().unwrap();
        }
        Err(e) => {
            eprintln!("{e}");
            let mut s: &dyn std::error::Error = &e;
            while let Some(src) = s.source() {
                eprintln!("caused by: {src}");
                s = src;
            }
        }
    }
}
