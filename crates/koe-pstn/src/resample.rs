//! Sample-rate conversion between Koe's 48 kHz voice and the telephone network's 8 kHz, for
//! streams that arrive one 20 ms frame at a time.
//!
//! The ratio is exactly 6, so one windowed-sinc low-pass filter serves both ways: upsampling
//! puts five zeros between samples and filters (a polyphase filter skips the zeros), and
//! downsampling filters and keeps every sixth sample. The filter passes the telephone band
//! (300–3400 Hz) flat and stops above 4 kHz, so nothing folds back into the band. It keeps its
//! history between frames, so frame edges cause no clicks, and it delays the signal by
//! [`DELAY_48K_SAMPLES`] (3 ms) each way.

/// 48 kHz samples per 8 kHz sample.
pub const RATIO: usize = 6;
/// Filter length at 48 kHz; a multiple of [`RATIO`], so each upsampling phase has
/// `TAPS / RATIO` taps.
pub const TAPS: usize = 288;
/// The filter's group delay, in 48 kHz samples (half a sample more: the length is even).
pub const DELAY_48K_SAMPLES: usize = TAPS / 2;
/// Where the filter's pass band ends and its transition starts (Hz at 48 kHz).
const CUTOFF_HZ: f64 = 3900.0;
const RATE_48K_HZ: f64 = 48_000.0;

/// The low-pass filter's taps, normalised to unit gain at DC.
fn design() -> [f32; TAPS] {
    let mut taps = [0.0f64; TAPS];
    let centre = (TAPS - 1) as f64 / 2.0;
    let fc = CUTOFF_HZ / RATE_48K_HZ;
    for (i, tap) in taps.iter_mut().enumerate() {
        let x = i as f64 - centre;
        let sinc = if x == 0.0 { 2.0 * fc } else { (2.0 * std::f64::consts::PI * fc * x).sin() / (std::f64::consts::PI * x) };
        // Blackman window: ~75 dB of stop band; at 288 taps the transition is ~900 Hz wide,
        // so 3.4 kHz is still flat and what is left above 4.4 kHz is attenuated.
        let n = i as f64 / (TAPS - 1) as f64;
        let window = 0.42 - 0.5 * (2.0 * std::f64::consts::PI * n).cos() + 0.08 * (4.0 * std::f64::consts::PI * n).cos();
        *tap = sinc * window;
    }
    let sum: f64 = taps.iter().sum();
    let mut out = [0.0f32; TAPS];
    for (o, t) in out.iter_mut().zip(taps) {
        *o = (t / sum) as f32;
    }
    out
}

/// 8 kHz → 48 kHz, keeping state across calls.
#[derive(Debug, Clone)]
pub struct Upsampler {
    taps: [f32; TAPS],
    /// The last `TAPS / RATIO` input samples, newest last.
    history: Vec<f32>,
}

impl Default for Upsampler {
    fn default() -> Self {
        Self { taps: design(), history: vec![0.0; TAPS / RATIO] }
    }
}

impl Upsampler {
    /// Appends `input.len() × 6` samples at 48 kHz to `out`.
    pub fn process(&mut self, input: &[f32], out: &mut Vec<f32>) {
        let per_phase = TAPS / RATIO;
        out.reserve(input.len() * RATIO);
        for &sample in input {
            self.history.rotate_left(1);
            self.history[per_phase - 1] = sample;
            for phase in 0..RATIO {
                // Output sample `phase` after the newest input: tap `phase + RATIO·k` meets
                // input `k` samples back; the zero-stuffed samples contribute nothing.
                let mut acc = 0.0f32;
                for k in 0..per_phase {
                    acc += self.taps[phase + RATIO * k] * self.history[per_phase - 1 - k];
                }
                out.push(acc * RATIO as f32);
            }
        }
    }
}

/// 48 kHz → 8 kHz, keeping state across calls. Input lengths that are not multiples of six
/// are fine: the phase carries over.
#[derive(Debug, Clone)]
pub struct Downsampler {
    taps: [f32; TAPS],
    /// The last `TAPS` input samples, newest last.
    history: Vec<f32>,
    /// Input samples since the last output sample.
    phase: usize,
}

impl Default for Downsampler {
    fn default() -> Self {
        Self { taps: design(), history: vec![0.0; TAPS], phase: 0 }
    }
}

impl Downsampler {
    /// Appends about `input.len() / 6` samples at 8 kHz to `out`.
    pub fn process(&mut self, input: &[f32], out: &mut Vec<f32>) {
        for &sample in input {
            self.history.rotate_left(1);
            self.history[TAPS - 1] = sample;
            self.phase += 1;
            if self.phase == RATIO {
                self.phase = 0;
                let acc: f32 = self.taps.iter().zip(self.history.iter().rev()).map(|(t, h)| t * h).sum();
                out.push(acc);
            }
        }
    }
}

/// 16-bit PCM to the `-1.0..1.0` floats Koe's voice engine uses, and back (clamped).
pub fn to_f32(sample: i16) -> f32 {
    f32::from(sample) / 32768.0
}

pub fn to_i16(sample: f32) -> i16 {
    (sample * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f64, rate: f64, samples: usize) -> Vec<f32> {
        (0..samples).map(|i| (0.5 * (2.0 * std::f64::consts::PI * hz * i as f64 / rate).sin()) as f32).collect()
    }

    fn rms(samples: &[f32]) -> f64 {
        (samples.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
    }

    /// Runs `input` through in 20 ms frames, as a call does.
    fn in_frames<T: Default>(input: &[f32], frame: usize, mut process: impl FnMut(&mut T, &[f32], &mut Vec<f32>)) -> Vec<f32> {
        let mut state = T::default();
        let mut out = Vec::new();
        for chunk in input.chunks(frame) {
            process(&mut state, chunk, &mut out);
        }
        out
    }

    #[test]
    fn the_telephone_band_passes_at_unit_gain_both_ways() {
        for hz in [300.0, 1000.0, 3000.0, 3400.0] {
            let narrow = tone(hz, 8000.0, 8000);
            let wide = in_frames(&narrow, 160, Upsampler::process);
            assert_eq!(wide.len(), 48_000);
            let gain = rms(&wide[4800..]) / rms(&narrow[800..]);
            assert!((gain - 1.0).abs() < 0.03, "{hz} Hz up: gain {gain}");
            let back = in_frames(&wide, 960, Downsampler::process);
            assert_eq!(back.len(), 8000);
            let gain = rms(&back[800..]) / rms(&narrow[800..]);
            assert!((gain - 1.0).abs() < 0.05, "{hz} Hz round trip: gain {gain}");
        }
    }

    #[test]
    fn what_would_fold_into_the_band_is_stopped() {
        // 5 kHz at 48 kHz would alias to 3 kHz at 8 kHz.
        let wide = tone(5000.0, 48_000.0, 48_000);
        let narrow = in_frames(&wide, 960, Downsampler::process);
        assert!(rms(&narrow[800..]) < 0.5 * 0.02, "aliased energy {}", rms(&narrow[800..]));
        // Upsampling leaves no image of a 1 kHz tone at 7 kHz: the output is a clean tone.
        let up = in_frames(&tone(1000.0, 8000.0, 8000), 160, Upsampler::process);
        // The filter delays by (TAPS − 1) / 2 samples at 48 kHz, half a sample off the grid:
        // compare with the tone delayed as much.
        let delay = (TAPS - 1) as f64 / 2.0;
        let clean: Vec<f32> =
            (0..48_000).map(|i| (0.5 * (2.0 * std::f64::consts::PI * 1000.0 * (i as f64 - delay) / 48_000.0).sin()) as f32).collect();
        let best = {
            let error: Vec<f32> = up[4800..40_000].iter().zip(&clean[4800..40_000]).map(|(a, b)| a - b).collect();
            rms(&error)
        };
        assert!(best < 0.01, "residual after alignment {best}");
    }

    #[test]
    fn frame_edges_are_seamless() {
        let narrow = tone(440.0, 8000.0, 1600);
        let whole = in_frames(&narrow, narrow.len(), Upsampler::process);
        let framed = in_frames(&narrow, 160, Upsampler::process);
        let odd = in_frames(&narrow, 7, Upsampler::process);
        assert_eq!(whole, framed);
        assert_eq!(whole, odd);
        let wide = tone(440.0, 48_000.0, 9600);
        assert_eq!(in_frames(&wide, 9600, Downsampler::process), in_frames(&wide, 961, Downsampler::process));
    }

    #[test]
    fn pcm_conversion_round_trips_and_clamps() {
        for sample in [i16::MIN, -1, 0, 1, 12345, i16::MAX] {
            assert_eq!(to_i16(to_f32(sample)), sample);
        }
        assert_eq!(to_i16(2.0), i16::MAX);
        assert_eq!(to_i16(-2.0), i16::MIN);
    }
}
