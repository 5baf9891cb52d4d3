fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let r = dccsign::keys::dev_init(std::path::Path::new(&dir), "SE").unwrap();
    println!("{:#?}", r);
}
