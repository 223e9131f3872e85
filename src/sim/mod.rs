//! finX simulator: a strict, scriptable stand-in for the finX API (see README "Simulator").
