use qed::{BlockDevice, CreateOptions, Image, OpenOptions};
fn main() -> qed::Result<()> {
    let p = std::env::args().nth(1).unwrap();
    Image::create(&p, &CreateOptions::new(10 << 20))?;
    let img = Image::open(&p, &OpenOptions::default())?;
    img.write_at(&[0xab; 4096], 4096)?;
    img.write_at(&[1; 131072], 2 << 20)?;
    img.write_zeroes(1 << 20, 65536)?;
    img.write_at(&[7; 100], 5 << 20)?;
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 4096)?;
    assert_eq!(b, [0xab; 4096]);
    img.close()?;
    Ok(())
}
