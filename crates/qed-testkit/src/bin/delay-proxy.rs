//! `delay-proxy PORT UPSTREAM DELAY_MS`: forwards 127.0.0.1:PORT (0: a free port) to
//! UPSTREAM (host:port), holding back the answer to every request until DELAY_MS after
//! it arrived. Prints the port it listens on, then runs until killed, printing to stderr
//! what it has seen (requests, most in flight at once) whenever that changed, each
//! second.

use qed_testkit::DelayProxy;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: delay-proxy PORT UPSTREAM_HOST:PORT DELAY_MS";
    let [port, upstream, delay] = args.as_slice() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let (Ok(port), Ok(delay)) = (port.parse::<u16>(), delay.parse::<u64>()) else {
        eprintln!("{usage}: PORT is 0 to 65535 and DELAY_MS a whole number");
        std::process::exit(2);
    };
    let proxy = match DelayProxy::start(port, upstream, Duration::from_millis(delay)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("delay-proxy: cannot forward to {upstream}: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", proxy.port());
    let mut shown = proxy.stats();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = proxy.stats();
        if now != shown {
            eprintln!(
                "requests {} max_in_flight {} max_range {} max_range_bytes_in_flight {} \
                 bytes_down {} connections {}",
                now.requests,
                now.max_in_flight,
                now.max_range,
                now.max_range_bytes_in_flight,
                now.bytes_down,
                now.connections
            );
            shown = now;
        }
    }
}
