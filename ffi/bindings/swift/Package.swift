// swift-tools-version:5.9
// The Swift binding over libedgetune_ffi (see ../../README.md, "Swift / iOS"). For an app,
// replace the system library by the xcframework that README builds
// (.binaryTarget(name: "CEdgetune", path: "EdgetuneFFI.xcframework")).
import PackageDescription

let package = Package(
    name: "Edgetune",
    products: [.library(name: "Edgetune", targets: ["Edgetune"])],
    targets: [
        .systemLibrary(name: "CEdgetune", path: "Sources/CEdgetune"),
        .target(name: "Edgetune", dependencies: ["CEdgetune"]),
    ]
)
